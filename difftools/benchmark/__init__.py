"""Benchmark harness of ``scripts/bench_train.py`` (training-step throughput), one job per module:

* :mod:`.train_step`: a row (:class:`Combo`), its speed :class:`Variant`, building and timing one
  training step (:func:`run_combo`), MFU against :data:`PEAK_TFLOPS`;
* :mod:`.plan`: which rows to run, most important first, and their expected duration;
* :mod:`.precompile`: compiling rows in parallel worker processes ahead of the timed pass;
* :mod:`.profiling`: kernel time by category (also :func:`kernel_ms` for ``scripts/bench_samplers.py``);
* :mod:`.reference_dit`: facebookresearch/DiT imported from a local folder;
* :mod:`.report`: the markdown / JSON table.
"""

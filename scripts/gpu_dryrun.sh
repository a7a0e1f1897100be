#!/usr/bin/env bash
# Rehearse a device call here, on the CPU, before it costs GPU time (docs/gpu_runbook.md).
#
#   scripts/gpu_dryrun.sh NAME "CARRY PATHS" 'COMMAND'
#   scripts/gpu_dryrun.sh s3 ".gpu/setup.sh .gpu/wheels_core .gpu/ref" \
#       'source .gpu/setup.sh && python3 scripts/search_gpu.py ... --device cpu --out $OUT/s3'
#
# It builds what the device tool sends — the tracked and untracked-not-ignored files of this checkout
# plus the CARRY paths (through symbolic links, as the tool copies a path that carry names) — in
# /tmp/gpu_dryrun/NAME/tree, where no ../shared sits beside it, and runs COMMAND there with $OUT an
# empty folder and `python3` the interpreter that holds torch ($DRYRUN_PYTHON, default
# /work/main/.venv/bin/python). So a command that imports something the carry lacks, reads a path that
# does not travel, or writes its results where they do not come back fails here, in seconds.
# Checked and printed: the size of what would travel (limit 64 MiB), the carry's sizes, the wall time,
# and whether $OUT's files would come back (at most 8 files, 16 MiB each and 64 MiB together, no
# deeper than $OUT/a/b/file, names of letters, digits, '.', '_' and '-').
# .gpu/setup.sh installs the wheels into the rehearsal's own folder (GPU_SITE) instead of /tmp/site, so
# rehearsals running side by side do not share one; DRYRUN_ABSENT overrides the list of packages made
# unimportable; DRYRUN_DIR the folder of the rehearsals. Exit status: the command's (2: refused here).
set -uo pipefail
if [ $# -ne 3 ]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
name=$1
carry=$2
command=$3
repo=$(git rev-parse --show-toplevel) || exit 2
base=${DRYRUN_DIR:-/tmp/gpu_dryrun}/$name
rm -rf "$base"
mkdir -p "$base/tree" "$base/out" "$base/bin"
cd "$repo" || exit 2
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c '[ -e "$1" ] && echo "$1"' _ {} \
    | tar -cf - -T - | tar -xf - -C "$base/tree"
for p in $carry; do
    if [ ! -e "$p" ]; then
        echo "dryrun: carry path $p does not exist in $repo (the device tool would remove it there)" >&2
        exit 2
    fi
    mkdir -p "$base/tree/$(dirname "$p")"
    cp -rL "$p" "$base/tree/$(dirname "$p")/"  # into its folder: merges with a carry path inside it
done
# Packages this interpreter has but the GPU image lacks (its package list: /work/.library/device/KINDS.md;
# those of the difference to the project's .venv that the project imports): importing one fails here as
# there, unless a carried wheel installed it into the rehearsal's site folder.
mkdir -p "$base/absent"
cat > "$base/absent/sitecustomize.py" <<PY
import importlib.abc, importlib.machinery, importlib.util, sys
ABSENT = set("${DRYRUN_ABSENT:-diffusers hydra omegaconf antlr4 cleanfid importlib_metadata xformers torchao}".split())
SITE = "$base/site"
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ABSENT or "." in name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [SITE])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU image; carry its wheel)",
                                      name=name)
        return spec
sys.meta_path.insert(0, Absent())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):  # optional-package probes see None, as for a package not installed
    try:
        return _find_spec(name, package)
    except ModuleNotFoundError as err:
        if "absent on the GPU image" in str(err):
            return None
        raise
importlib.util.find_spec = find_spec
PY
# a wrapper, not a link: a virtual environment's python finds its packages only when called by its path
printf '#!/bin/sh\nPYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}%s" exec %s "$@"\n' "$base/absent" \
    "${DRYRUN_PYTHON:-/work/main/.venv/bin/python}" > "$base/bin/python3"
chmod +x "$base/bin/python3"

tree_mib=$(du -sm "$base/tree" | cut -f1)
echo "dryrun $name: what travels: ${tree_mib} MiB (limit 64 MiB)"
for p in $carry; do echo "  carry $(du -shL "$p" | cut -f1)  $p"; done
if [ "$tree_mib" -ge 64 ]; then
    echo "dryrun: OVER THE 64 MiB LIMIT: the device tool would refuse this call" >&2
    exit 2
fi

start=$(date +%s)
(cd "$base/tree" && env -u PYTHONPATH OUT="$base/out" GPU_SITE="$base/site" PATH="$base/bin:$PATH" bash -c "$command")
rc=$?
echo "dryrun $name: exit $rc after $(( $(date +%s) - start )) s"

# What of $OUT would come back.
(cd "$base/out" && find . -mindepth 1 | sort) | python3 -c '
import os, re, sys
out = sys.argv[1]
files = [p[2:] for p in sys.stdin.read().split() if os.path.isfile(os.path.join(out, p))]
bad = []
for f in files:
    size = os.path.getsize(os.path.join(out, f))
    if f.count("/") > 2:
        bad.append(f"{f} (more than 2 folders down)")
    elif not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in f.split("/")):
        bad.append(f"{f} (a name with other characters)")
    elif size > 16 * 2**20:
        bad.append(f"{f} (over 16 MiB)")
total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
print(f"dryrun: $OUT holds {len(files)} files, {total / 2**20:.1f} MiB")
for f in files:
    print(f"  {f}")
if len(files) > 8:
    bad.append(f"{len(files)} files (at most 8 come back: pack them, e.g. tar -czf $OUT/x.tgz)")
if total > 64 * 2**20:
    bad.append("over 64 MiB together")
for b in bad:
    print(f"dryrun: WOULD NOT COME BACK: {b}")
' "$base/out"
exit $rc

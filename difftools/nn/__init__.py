"""Neural-network building blocks shared by difftools models.

``from difftools.nn.attention import attention`` (the function is not re-exported here so that
``difftools.nn.attention`` keeps naming the module).
"""

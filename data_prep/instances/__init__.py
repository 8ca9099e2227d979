"""Pre-masked training instances: one module per instance type, each registering itself on import.

plmscale prep instances --shards data/shards --objective nsp --out data/instances/nsp
plmscale prep stats data/instances/nsp
"""

from data_prep.instances import bert, denoising, permutation, unilm  # noqa: F401

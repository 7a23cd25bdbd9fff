"""nba_core: backdoor removal library (NBA as reconstructed from the published abstract, plus baselines).

Importing this package does not import torch: the torch-free parts (errors, spec, safetensors header checks,
data-format checks) are used by the API process, which must stay light.
"""

__version__ = "0.1.0"

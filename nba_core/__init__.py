"""nba_core: backdoor removal library (NBA as reconstructed from the published abstract, plus baselines).

Importing this package does not import torch: the torch-free parts (errors, spec, safetensors header checks,
data-format checks) are used by the API process, which must stay light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `nba_core.sanitize_module` without importing torch for the API process, which only imports submodules.
    if name == "sanitize_module":
        from .module_api import sanitize_module

        return sanitize_module
    raise AttributeError(f"module 'nba_core' has no attribute {name!r}")

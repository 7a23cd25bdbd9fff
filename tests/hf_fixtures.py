"""Tiny Hugging Face classifiers (built by transformers from configs) backdoored on sklearn digits (8×8), shared by
the core and service tests. Seconds to train; they exercise the HF path, not the quality of the defenses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_RESNET = {"model_type": "resnet", "layer_type": "basic", "embedding_size": 8, "hidden_sizes": [16, 32],
               "depths": [1, 1], "hidden_act": "relu", "downsample_in_first_stage": False, "num_channels": 1,
               "num_labels": 10}
TINY_VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
            "intermediate_size": 64, "patch_size": 2, "image_size": 8, "num_channels": 1, "num_labels": 10,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def backdoored_hf_digits(config: dict, folder: Path, *, epochs: int = 12) -> dict[str, Any]:
    """Train `config` on BadNets-poisoned digits; write the HF folder (save_pretrained layout), its zip, the
    clean subset and a triggered probe set into `folder`."""
    import numpy as np
    import torch

    from nba_core.data.formats import save_npz
    from nba_core.experiment import backdoor_experiment
    from nba_core.hf_io import pack_hf_zip
    from nba_core.models.hf import write_hf_folder

    torch.set_num_threads(1)
    run = backdoor_experiment("digits", "badnets", seed=0, epochs=epochs, clean_fraction=0.3, device="cpu",
                              hf_config=config)
    files: dict[str, Any] = {"folder": folder / "model", "zip": folder / "model.zip", "clean": folder / "clean.npz",
                             "probe": folder / "probe.npz", "test": folder / "test.npz"}
    write_hf_folder(run.model, run.spec, files["folder"])
    pack_hf_zip(files["folder"], files["zip"])
    save_npz(files["clean"], run.clean_subset)
    save_npz(files["probe"], run.test_triggered.subset(np.arange(min(200, len(run.test_triggered)))))
    save_npz(files["test"], run.test)
    files.update(target=run.attack.target, clean_accuracy=run.clean_accuracy, asr=run.attack_success_rate,
                 spec=run.spec)
    return files

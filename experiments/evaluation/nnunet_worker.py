"""One nnU-Net v2 run, in its own process: plan, preprocess, train, predict (``nnunet_judge`` starts it).

``python -m experiments.evaluation.nnunet_worker JOB.json``. The job names the dataset id, the
trainer class, the budget, the device and the folders; ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` come from the environment the parent sets. Everything is nnU-Net's own code:
its fingerprint, its default experiment planner (3d_fullres), its preprocessing, its trainer on
fold ``all`` and its sliding-window predictor. Only the budget may be changed (epochs, iterations
per epoch), for a CPU smoke run; the full judge keeps nnU-Net's schedule.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _trainer_class(name: str) -> type:
    # Imported by name, not through nnU-Net's class search, which imports every trainer variant
    # (some need timm and torchvision, which a CPU install may not have).
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs

    return getattr(nnUNetTrainer_Xepochs, name)


def run(job: dict) -> None:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    torch.manual_seed(job["seed"])
    dataset = job["dataset_id"]
    extract_fingerprints([dataset], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([dataset])
    preprocess([dataset], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
    if job["device"] == "cpu":
        # Planning set torch's threads to the augmentation workers (1); a CPU run then augments
        # in-process (0 workers: nnU-Net's single-threaded augmenter). A GPU run keeps nnU-Net's pool.
        os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 (nnU-Net's spelling)
    preprocessed = Path(job["preprocessed"]) / convert_id_to_dataset_name(dataset)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # as nnU-Net's own get_trainer_from_args sets it
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    device = torch.device(job["device"])
    trainer = _trainer_class(job["trainer"])(plans, "3d_fullres", "all", dataset_json, device=device)
    if job["epochs"] is not None:
        trainer.num_epochs = job["epochs"]
        trainer.num_iterations_per_epoch = job["iterations"]
        trainer.num_val_iterations_per_epoch = job["val_iterations"]
    trainer.run_training()
    trainer.set_deep_supervision_enabled(False)  # as nnU-Net's own validation does before predicting
    trainer.network.eval()
    predictor = nnUNetPredictor(device=device, allow_tqdm=False, verbose=False)
    predictor.manual_initialization(
        trainer.network,
        trainer.plans_manager,
        trainer.configuration_manager,
        [trainer.network.state_dict()],
        trainer.dataset_json,
        type(trainer).__name__,
        trainer.inference_allowed_mirroring_axes,
    )
    Path(job["predictions"]).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(job["test_images"], job["predictions"], overwrite=True)
    summary = {
        "trainer": job["trainer"],
        "epochs": trainer.num_epochs,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "patch_size": [int(s) for s in trainer.configuration_manager.patch_size],
    }
    Path(job["summary"]).write_text(json.dumps(summary))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))

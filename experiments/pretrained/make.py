"""Make the public pre-trained weights the demo starts from (``make pretrained``).

The demo's sites fine-tune a model pre-trained on public data under DP-SGD (Daum et al. 2024:
public pre-training is what makes a low-ε fine-tune work). This script trains that model the way
the demo would at run time (``experiments.demo.pretrain_public``: the same ``gem3d demo-data`` and
``gem3d train`` commands, no patient data, no DP), only longer and on more public cases, then
keeps the EMA weights alone (``gem3d.runs.export_weights``) in ``experiments/pretrained/demo``:

* ``pretrained/slice.safetensors``, ``pretrained/informed.safetensors``: GEM-3D's slice denoiser
  and informed-slice generator, the sites' starting point;
* ``pretrained_mask_only/volume.safetensors``: the mask-only baseline (no informed slice), the
  same public data and slice steps, for the evaluation;
* ``PRETRAINED.json``: the data recipe (``gem3d demo-data`` arguments), the config overrides, the
  steps, this command, library versions and every file's sha256 (the demo checks them).

The demo uses these files when the manifest's overrides and slice size are its own; otherwise it
trains at run time as before. Same command, same library versions: same weights (training is
seeded; no DP).

    .venv/bin/python experiments/pretrained/make.py [--sites 4] [--cases 4] [--slice-steps 1000] [--informed-steps 1200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's packages before this folder's scripts

import torch

from experiments.demo import PRETRAIN_SET, SHIPPED, SHIPPED_MANIFEST, DemoSettings, DemoState, pretrain_public
from gem3d.checkpoint import file_sha256, library_versions
from gem3d.runs import export_weights

FILES = ("pretrained/slice.safetensors", "pretrained/informed.safetensors", "pretrained_mask_only/volume.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DemoSettings()
    parser.add_argument("--sites", type=int, default=defaults.public_sites, help="public scanners (pooled)")
    parser.add_argument("--cases", type=int, default=defaults.public_cases, help="public cases per scanner")
    parser.add_argument("--slice-steps", type=int, default=defaults.pretrain_steps[0])
    parser.add_argument("--informed-steps", type=int, default=defaults.pretrain_steps[1])
    parser.add_argument("--mask-only-volume-steps", type=int, default=defaults.mask_only_steps[1])
    parser.add_argument("--out", type=Path, default=SHIPPED)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the demo's setting (and the mask-only baseline trains alongside)
    settings = replace(
        DemoSettings(),
        public_sites=args.sites,
        public_cases=args.cases,
        pretrain_steps=(args.slice_steps, args.informed_steps),
        mask_only_steps=(args.slice_steps, args.mask_only_volume_steps),
        shipped=None,  # train, do not install the old weights
    )
    with tempfile.TemporaryDirectory() as work:
        state = DemoState(out=Path(work), settings=settings)
        pretrain_public(state, Path(work) / "mlflow")
        staging = Path(work) / "export"
        data = {"command": "gem3d demo-data --pooled", "sites": args.sites, "cases_per_site": args.cases,
                "cases": args.sites * args.cases, "test": 0, "size": settings.size, "seed": 1}  # fmt: skip
        for name in FILES:
            export_weights(state.out / name, staging / name, public_data_recipe=data)
        manifest = {
            "what": "public pre-trained weights for gem3d demo (EMA weights only; no patient data, no DP)",
            "command": "make pretrained (.venv/bin/python experiments/pretrained/make.py "
            f"--sites {args.sites} --cases {args.cases} --slice-steps {args.slice_steps} "
            f"--informed-steps {args.informed_steps} --mask-only-volume-steps {args.mask_only_volume_steps})",
            "data": data,
            "overrides": settings.overrides,
            "pretrain_overrides": PRETRAIN_SET,
            "steps": {"gem3d": list(settings.pretrain_steps), "mask_only": list(settings.mask_only_steps)},
            "versions": library_versions(),
            "files": {name: file_sha256(staging / name) for name in FILES},
        }
        (staging / SHIPPED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, args.out)
    sizes = {name: (args.out / name).stat().st_size for name in FILES}
    print(json.dumps({"out": str(args.out), "bytes": sizes, "total_mib": sum(sizes.values()) / 2**20}, indent=2))


if __name__ == "__main__":
    main()

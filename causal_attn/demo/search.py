"""Recipe search for the STG part, scored on the validation splits only (``python -m causal_attn.demo.search``).

Each line of ``--grid`` (JSON) is ``{"name": ..., "extra": N, **Recipe fields}``; every setting is trained
vanilla and CAT for each seed and scored on the IID / OOD validation sets generated with
:data:`causal_attn.demo.stg.VAL_SEED` (never on the released test files). One JSON line per run is
appended to ``--out``; vanilla runs that differ only in CAT-only fields (alpha, gamma, patch_layers) are
trained once.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from .fit import Recipe

CAT_ONLY = ("alpha", "gamma", "gamma_decay", "patch_layers")
_SETUPS: dict = {}


def _run(setting: dict, method: str, seed: int) -> dict:
    import torch

    from .stg import Setup, one_run

    torch.set_num_threads(1)
    extra = setting.get("extra", 0)
    if extra not in _SETUPS:
        _SETUPS[extra] = Setup(extra, False, "val")
    fields = {k: v for k, v in setting.items() if k in Recipe.__dataclass_fields__}
    if fields.get("patch_layers") is not None:
        fields["patch_layers"] = tuple(fields["patch_layers"])
    res = one_run(method, seed, Recipe(**fields), _SETUPS[extra])
    return {"setting": setting, "method": method, "seed": seed, "val_iid": res["iid_acc"], "val_ood": res["ood_acc"],
            "mass": res["attention_mass"], "seconds": res["seconds"], "train_records": len(_SETUPS[extra].train)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help="JSON file: a list of settings")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    grid = json.load(open(args.grid))
    tasks, seen = [], set()
    for seed in args.seeds:
        for s in grid:
            for m in ("vanilla", "cat"):
                key = json.dumps({k: v for k, v in s.items() if m == "cat" or k not in CAT_ONLY + ("name",)},
                                 sort_keys=True) + m + str(seed)
                if key not in seen:
                    seen.add(key)
                    tasks.append((s, m, seed))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool, open(args.out, "a") as f:
        for r in pool.map(_run, *zip(*tasks)):
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"{r['setting'].get('name')} {r['method']} seed {r['seed']}: val IID {r['val_iid']:.3f} "
                  f"OOD {r['val_ood']:.3f} ({r['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

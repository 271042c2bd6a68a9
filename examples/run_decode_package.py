"""Runs an AOTInductor package of the decode step (examples/decode_layer.py) in this process.

    PYTHONPATH=<repo> python examples/run_decode_package.py PACKAGE.pt2 INPUTS.pt RESULTS.pt

INPUTS.pt (torch.save of a dict): k_cache, block_table, and `steps`, a list of dicts with hidden,
cache_seqlens and slot_mapping. Every step runs on the same k_cache tensor, which the package updates
in place. RESULTS.pt gets each step's output and cache, and whether k_cache kept its storage.

The one rule for deployment: import flashmla_ops before loading the package. The package calls
torch.ops.flashmla.* by name; importing flashmla_ops loads the library that registers them.
"""

import sys

import flashmla_ops  # noqa: F401  (must come before aoti_load_package: registers torch.ops.flashmla)
import torch


def main(package_path: str, inputs_path: str, results_path: str) -> None:
    inputs = torch.load(inputs_path)
    runner = torch._inductor.aoti_load_package(package_path)
    k_cache, block_table = inputs["k_cache"], inputs["block_table"]
    data_ptr = k_cache.data_ptr()
    outputs, caches = [], []
    for step in inputs["steps"]:
        outputs.append(
            runner(step["hidden"], k_cache, block_table, step["cache_seqlens"], step["slot_mapping"])
        )
        caches.append(k_cache.clone())
    torch.save(
        {"outputs": outputs, "caches": caches, "same_storage": k_cache.data_ptr() == data_ptr}, results_path
    )
    print(f"ran {len(outputs)} decode steps from {package_path} on {k_cache.device}")


if __name__ == "__main__":
    main(*sys.argv[1:])

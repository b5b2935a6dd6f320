"""Pre-RoPE vs post-RoPE key coding for CSR: train the same small key dictionaries on pre- and on post-RoPE keys
of the default text, then measure the relative reconstruction error of held-out keys (another text) coded
each way with Matching Pursuit.

    PYTHONPATH=. python benchmarks/csr_rope.py [--atoms 256] [--vectors 4096] [--epochs 2] [--sparsity 8 4]
"""

import argparse
import time

from gearkit.compressors.solvers import combine_atoms, matching_pursuit
from gearkit.models import load_default_model, load_text
from gearkit.neuraldict import collect_kv, fit, group_vectors, layer_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--group-layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sparsity", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--train-text", default="pydoc-topics")
    parser.add_argument("--test-text", default="idle-help")
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    print("| key space | s | held-out relative error (mean over layer groups) | train s |\n|---|---|---|---|")
    for pre in (True, False):
        train_keys, _ = collect_kv(model, tokenizer, load_text(args.train_text), args.tokens, 1, pre_rope=pre)
        test_keys, _ = collect_kv(model, tokenizer, load_text(args.test_text), args.tokens, 1, pre_rope=pre)
        groups = layer_groups(train_keys.shape[0], args.group_layers)
        start = time.perf_counter()
        atoms, _ = fit(
            group_vectors(train_keys, groups, 1, args.vectors),
            args.atoms,
            max(args.sparsity),
            args.epochs,
            progress=False,
        )
        seconds = time.perf_counter() - start
        test = group_vectors(test_keys, groups, 1, args.vectors, seed=1)  # [groups, n, head_dim]
        for s in args.sparsity:
            out = combine_atoms(*matching_pursuit(test, atoms, s), atoms)
            err = ((out - test).norm(dim=(1, 2)) / test.norm(dim=(1, 2))).mean().item()
            print(f"| {'pre-RoPE' if pre else 'post-RoPE'} | {s} | {err:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Write the labelled verifier corpus (gold, completion, correct?) to a jsonl file.

    python scripts/make_verifier_corpus.py --out data/generated/verifier_corpus.jsonl
    python scripts/make_verifier_corpus.py --out corpus.jsonl --eval-parquet ../shared/data/eval/luffy_valid_all.parquet
    python scripts/make_verifier_corpus.py --out corpus.jsonl --builtin-only --seed 1

Deterministic for given golds and seed (see scripts/devtools/verifier_corpus.py for how the forms and their
labels are built, and which golds are held out). One JSON object per line: source, gold, family, form,
answer, completion, label, policy, split. Prints the counts per part, label and gold family.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from devtools import verifier_corpus as vc  # scripts/devtools (this script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eval-parquet", type=Path, default=None, help="verl eval parquet with AIME/AMC/MATH golds")
    ap.add_argument("--builtin-only", action="store_true", help="only the golds shipped with the package")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-frac", type=float, default=0.3)
    args = ap.parse_args()
    if args.builtin_only:
        golds, line = [("builtin", g) for g in vc.BUILTIN_GOLDS], f"{len(vc.BUILTIN_GOLDS)} builtin golds"
    else:
        golds, line = vc.default_golds(args.eval_parquet)
    items = vc.build_corpus(golds, seed=args.seed, heldout_frac=args.heldout_frac)
    vc.write_corpus(items, args.out)
    print(f"{len(items)} pairs from {line} -> {args.out}")
    for part in ("tune", "heldout"):
        c = Counter(it.label for it in items if it.split == part)
        print(f"  {part:8s}: {c[True] + c[False]:5d} pairs ({c[True]} right, {c[False]} wrong)")
    print("  families: " + ", ".join(f"{f} {n}" for f, n in Counter(it.family for it in items).most_common()))


if __name__ == "__main__":
    main()

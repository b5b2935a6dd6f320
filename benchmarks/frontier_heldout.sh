#!/bin/sh
# Held-out figures of the 3-bit frontier (issue 15): the same protocol as frontier_sweep.py on pydoc-topics,
# a text no choice was tuned on (the sweep ran on idle-help). Anchors and baselines first, gearkit's own after.
set -e
export OMP_NUM_THREADS=1 PYTHONPATH=.
python benchmarks/frontier_sweep.py --text pydoc-topics --windows 2 --out benchmarks/results/frontier_heldout_anchors.md \
    --only sink-3 sink-4 sink-gear-2 kivi-3 kivi-4 hf-quanto-2 hf-quanto-4 turboquant-2.5 turboquant-3.5 kvquant-2 kvquant-3
# round 1's uniform compositions (registered as gk-* then; frontier_heldout_gearkit.md and _gk25.md were run by those names)
python benchmarks/frontier_sweep.py --text pydoc-topics --windows 2 --out benchmarks/results/frontier_heldout_gearkit.md \
    --only K:had-lm2/V:had-lm2 K:ch3/V:had-lm2 K:ch3/V:had-lm3 K:ch4/V:had-lm4
# issue 15, second round: per-layer bit allocations (benchmarks/bit_allocation.py, tuned on idle-help), the gk-* recipes
# (the allocations of that round are kept in results/bit_allocation_round2.json)
python benchmarks/frontier_sweep.py --text pydoc-topics --windows 2 --out benchmarks/results/frontier_heldout_alloc.md \
    --only alloc-2.5 alloc-3.0 alloc-3.5 alloc-4.5 --allocations benchmarks/results/bit_allocation_round2.json
# issue 15, third round: per-KV-head widths and a low-rank rung on the ladder (bit_allocation.py heads, measure,
# allocate --heads ...; stored in gearkit/allocations, the gk-* recipes at 2.5, 3 and 3.5 bits) ...
python benchmarks/frontier_sweep.py --text pydoc-topics --windows 2 --out benchmarks/results/frontier_heldout_alloc3.md \
    --only alloc-2.5 alloc-3.0 alloc-3.5 --allocations benchmarks/results/bit_allocation_round3.json
# ... and the same without the low-rank rung (allocate --without pre-lr1+had-lm2): what the low-rank term earns
python benchmarks/frontier_sweep.py --text pydoc-topics --windows 2 \
    --out benchmarks/results/frontier_heldout_alloc3_without_lowrank.md --only alloc-2.5 alloc-3.0 \
    --allocations benchmarks/results/bit_allocation_round3_without_lowrank.json
# issue 15, fourth round: the same ladder and per-head widths, sensitivities averaged over three windows of idle-help
# instead of one; results/bit_allocation_round4.json = gearkit/allocations (its `source` is the allocate command),
# bit_allocation_round3.json the previous package file. The two new windows were measured by
#   python benchmarks/bit_allocation.py measure --skip 1 --windows 2 --out benchmarks/results/bit_allocation_sensitivity_idle-help_w2-3.json
#   python benchmarks/bit_allocation.py heads --skip 1 --windows 2 --out benchmarks/results/bit_allocation_heads_keys_idle-help_w2-3.json
#   python benchmarks/bit_allocation.py heads --role value --widths had-lm2 had-lm3 --skip 1 --windows 2 \
#       --out benchmarks/results/bit_allocation_heads_values_idle-help_w2-3.json
python benchmarks/frontier_sweep.py --text pydoc-topics --windows 2 --out benchmarks/results/frontier_heldout_alloc4.md \
    --only alloc-2.5 alloc-3.0 alloc-3.5 alloc-4.5 --allocations benchmarks/results/bit_allocation_round4.json
# a second held-out text (legal English, on every Debian machine), both rounds
for r in 3 4; do
    python benchmarks/frontier_sweep.py --text /usr/share/common-licenses/GPL-3 --windows 2 \
        --out benchmarks/results/frontier_heldout_gpl3_round$r.md --only alloc-2.5 alloc-3.0 alloc-3.5 alloc-4.5 \
        --allocations benchmarks/results/bit_allocation_round$r.json
done

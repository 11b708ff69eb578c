#!/usr/bin/env python3
"""An independent re-check of `herald verify --out DIR` histories, sharing no code with herald.

Reads DIR/history-<mode>.jsonl (every produced message with its ledger-resolved outcome, every
delivery, every applied effect, every dead letter) and recomputes, per mode: lost, phantom,
out-of-order applied effects, duplicate deliveries and duplicate effects. Compares its counts
with DIR/verify.json and exits non-zero if they disagree, or if the outbox mode shows any loss,
phantom, reorder or duplicate effect.

    python3 tools/check_history.py DIR
"""
import json
import pathlib
import sys


def check(path):
    produced, delivered, applied, dead = {}, [], [], set()
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        (kind, body), = rec.items()
        if kind == "produced":
            produced[body["id"]] = body
        elif kind == "delivered":
            delivered.append(body)
        elif kind == "applied":
            applied.append(body)
        elif kind == "dead_lettered":
            dead.add(body["id"])
    committed = {i for i, b in produced.items() if b["outcome"] == "committed"}
    delivered_ids = [d["id"] for d in delivered]
    applied_ids = [a["id"] for a in applied]
    seen = set(delivered_ids) | set(applied_ids)
    lost = sorted(committed - seen - dead)
    phantom = sorted(seen - committed)
    duplicates = len(delivered_ids) - len(set(delivered_ids))
    duplicate_effects = len(applied_ids) - len(set(applied_ids))
    # Per key, each applied version must be above every version applied before it.
    highest, reordered = {}, 0
    for a in applied:
        if a["version"] < highest.get(a["key"], 0):
            reordered += 1
        else:
            highest[a["key"]] = a["version"]
    return {
        "committed": len(committed),
        "lost": len(lost),
        "phantom": len(phantom),
        "out_of_order": reordered,
        "duplicate_deliveries": duplicates,
        "duplicate_effects": duplicate_effects,
    }


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = pathlib.Path(sys.argv[1])
    reported = {m["mode"]: m for m in json.loads((root / "verify.json").read_text())["modes"]}
    failed = False
    print(f"{'mode':<18} {'committed':>9} {'lost':>6} {'phantom':>7} {'reorder':>7} {'dup-deliv':>9} {'dup-effs':>8}  agrees")
    for mode, theirs in reported.items():
        ours = check(root / f"history-{mode}.jsonl")
        agrees = all(ours[k] == theirs[k] for k in ours)
        print(f"{mode:<18} {ours['committed']:>9} {ours['lost']:>6} {ours['phantom']:>7} "
              f"{ours['out_of_order']:>7} {ours['duplicate_deliveries']:>9} {ours['duplicate_effects']:>8}  "
              f"{'yes' if agrees else 'NO: verify.json says ' + json.dumps({k: theirs[k] for k in ours})}")
        failed |= not agrees
        if mode == "outbox" and any(ours[k] for k in ("lost", "phantom", "out_of_order", "duplicate_effects")):
            print("outbox: guarantee violated")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

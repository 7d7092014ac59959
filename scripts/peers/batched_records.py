"""llama.cpp's `llama-batched-bench --output-format jsonl` lines (standard input) as records for
`scripts/bench.py --summarize` (standard output): each line as it came, plus the peer's name, the GGUF it ran
(the `llama-batched-bench` lines do not say) and the card's name, as our bench records it, so that the summary
sets it against ours at the same batch on the same card (scripts/targets.sh).

    llama-batched-bench -m F.gguf ... -npl 8,32 --output-format jsonl \\
        | python scripts/peers/batched_records.py --model F.gguf --gpu "NVIDIA H200" >> targets.jsonl

Lines that are not JSON objects (llama.cpp's log, when it goes to standard output) are passed over; a JSON
line without the fields the summary reads (`pl`, `tg`, `speed_tg`) stops it, naming the line.
"""

import argparse
import json
import sys

PEER = "llama.cpp batched"
FIELDS = ("pl", "tg", "speed_tg")


def records(lines, model: str, gpu: str):
    """The tagged records of the JSON lines among `lines`; ValueError naming the line of one that lacks FIELDS."""
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {n}: not a JSON record: {e}") from None
        missing = [f for f in FIELDS if f not in r]
        if missing:
            raise ValueError(f"line {n}: no {', '.join(missing)} (not a llama-batched-bench jsonl line?)")
        out.append(dict(r, peer=PEER, model_filename=model, gpu=gpu))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the GGUF llama-batched-bench ran (its file name names it)")
    ap.add_argument("--gpu", required=True, help="the card's name, as bench.py records it (CUDA's device name)")
    args = ap.parse_args(argv)
    try:
        recs = records(sys.stdin, args.model, args.gpu)
    except ValueError as e:
        sys.exit(f"batched_records.py: standard input {e}")
    if not recs:
        sys.exit("batched_records.py: no llama-batched-bench record on standard input")
    for r in recs:
        print(json.dumps(r))


if __name__ == "__main__":
    main()

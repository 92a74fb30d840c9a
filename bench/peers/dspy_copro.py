"""DSPy's COPRO against an OpenAI-compatible server; prints {"wall_s", "depth"} as JSON.

.venv-peers/bin/python bench/peers/dspy_copro.py --url http://127.0.0.1:8300/v1 --data examples.json
"""

import argparse
import json
import time

import dspy
from dspy.teleprompt import COPRO


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", required=True, help='JSON: {"examples": [{"input", "target"}], "labels": [...]}')
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--breadth", type=int, default=8)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    data = json.load(open(args.data))
    lm = dspy.LM("openai/sim-model", api_base=args.url, api_key="none", cache=False, max_tokens=256, num_retries=2)
    dspy.configure(lm=lm)
    trainset = [dspy.Example(text=e["input"], category=e["target"]).with_inputs("text") for e in data["examples"]]
    program = dspy.Predict("text -> category")

    def metric(example, prediction, trace=None) -> bool:
        return str(getattr(prediction, "category", "")).strip().lower() == example.category.lower()

    optimizer = COPRO(metric=metric, breadth=args.breadth, depth=args.depth, init_temperature=1.0)
    started = time.monotonic()
    optimizer.compile(program, trainset=trainset, eval_kwargs={"num_threads": args.threads, "display_progress": False})
    print(json.dumps({"wall_s": round(time.monotonic() - started, 3), "depth": args.depth}))


if __name__ == "__main__":
    main()

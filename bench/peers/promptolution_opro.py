"""promptolution's OPRO against an OpenAI-compatible server; prints {"wall_s", "steps"} as JSON.

.venv-peers/bin/python bench/peers/promptolution_opro.py --url http://127.0.0.1:8300/v1 --data examples.json
"""

import argparse
import json
import time

import pandas as pd
from promptolution.llms.api_llm import APILLM
from promptolution.optimizers.opro import OPRO
from promptolution.predictors.first_occurrence_predictor import FirstOccurrencePredictor
from promptolution.tasks.classification_tasks import ClassificationTask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", required=True, help='JSON: {"examples": [{"input", "target"}], "labels": [...]}')
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    data = json.load(open(args.data))
    labels = [label.lower() for label in data["labels"]]
    df = pd.DataFrame(
        {"x": [e["input"] for e in data["examples"]], "y": [e["target"].lower() for e in data["examples"]]}
    )
    llm = APILLM(
        api_url=args.url, model_id="sim-model", api_key="none", max_concurrent_calls=args.concurrency, max_tokens=256
    )
    task = ClassificationTask(df, task_description="Classify the text into its category.", eval_strategy="full")
    predictor = FirstOccurrencePredictor(llm, labels)
    optimizer = OPRO(
        predictor,
        task,
        meta_llm=llm,
        initial_prompts=["Classify the text into its category."],
        num_instructions_per_step=8,
    )
    started = time.monotonic()
    optimizer.optimize(n_steps=args.steps)
    print(json.dumps({"wall_s": round(time.monotonic() - started, 3), "steps": args.steps}))


if __name__ == "__main__":
    main()

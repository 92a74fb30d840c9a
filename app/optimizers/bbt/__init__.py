"""BBT and BBTv2 - Black-Box Tuning (Sun et al., ICML 2022; EMNLP 2022), with BBT-RGB's options (LREC-COLING 2024).

Adapted to decoder LMs (docs/methods/bbt.md). The template keeps the initial (manual) instruction in its {prompt}
slot; its tokens are the soft prompt's placeholders: at most `prompt_length` of them, from the instruction's start.

* BBT, `insertion="add"` (the original method's form): A z (A a fixed random projection, CMA-ES
  searching z in R^d) is ADDED to the input embeddings of the placeholder tokens. z = 0 is exactly the manual
  prompt, so the search starts from it. `insertion="prepend"`: A z is `prompt_length` new vectors in front of
  the rendered prompt (after any BOS) instead; the default, as it scored higher on our benchmark.
* BBTv2, `insertion="add"` (default): A_l z_l is added to the placeholder tokens' hidden states before every
  decoder layer l; A_l is scaled by layer l's clipped hidden-state std over the scoring inputs. One CMA-ES per
  layer, swept layer by layer (one generation per layer per round), the other layers held at their best; all
  z_l = 0 is the manual prompt. `insertion="prepend"`: a key/value prefix of `prompt_length` virtual tokens at
  every layer, scaled by each layer's clipped key/value statistics; a not yet searched layer carries an
  all-zero prefix, which still draws attention, so that form does not start from the manual prompt.
* Loss: `ce` (cross-entropy over the verbalizers' first-token log-probs) or `hinge` (margin 2), on the training
  split (or a seeded subset) in one batch per generation. Reported candidate scores are train accuracy.
* Stage 2 (BBT-RGB): COBYLA (SciPy) from the best z for `budget2` evaluations (BBTv2: split over the layers).
* Mixed initialisation (BBT-RGB, `demonstrations` > 0): the hard prompt is the instruction followed by that many
  training examples as demonstrations (drawn and rendered by `app.evaluation.demonstrations`, which every method
  shares); it takes the instruction's place everywhere (its tokens are the `add` form's placeholders, the
  artifact's `text`), and the demonstrations are left out of the scoring set.
* Per-layer step sizes (BBT-RGB, BBTv2 `sigma2`): layer 0's CMA-ES starts at `sigma`, the others at `sigma2`
  (or on a linear / exponential schedule between them); the projections keep `sigma` in their std, as BBT-RGB's.
* The verbalizer ensemble (BBT-RGB's several words per label) is the task's: `Task.label_logprobs`.

Step 0 scores the manual prompt and measures the model's scales; each later step is one CMA-ES generation
(BBTv2: of one layer), or one COBYLA run. Model selection on dev happens every `eval_every` evaluations.
"""

from __future__ import annotations

import asyncio
import math
import threading
import warnings
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from app.evaluation.demonstrations import compose, pick_demonstrations, render_demonstration
from app.evaluation.evaluator import SoftPrompt
from app.evaluation.task import Example, Task
from app.llm.port import Capability, ContinuousPrefix, PrefixKind
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    StepReport,
    label_task_problems,
    subset_positions,
)
from app.optimizers.bbt.cmaes import CmaSearch, CmaSettings
from app.optimizers.bbt.projection import (
    ARTIFACT_VERSION,
    describe,
    hidden_layer_vectors,
    input_projection,
    layer_vectors,
    project,
    projection_std,
    soft_prompt_from_artifact,
)

HINGE_MARGIN = 2.0


class BbtParams(MethodParams):
    prompt_length: int = Field(
        50,
        ge=1,
        le=256,
        description="Soft-prompt vectors n: placeholder tokens (add: the instruction's first n tokens at most) "
        "or virtual tokens (prepend).",
    )
    # Defaults by the dbpedia16 benchmark (docs/methods/bbt.md): prepend for BBT, add for BBTv2.
    insertion: Literal["add", "prepend"] = Field(
        "prepend",
        description="add: vectors added to the instruction's tokens (z = 0 is the manual prompt); "
        "prepend: new vectors (BBT) or key/value prefixes (BBTv2) in front of the prompt.",
    )
    intrinsic_dim: int = Field(500, ge=1, le=5000, description="Dimension d of the searched z.")
    popsize: int = Field(20, ge=2, le=512, description="CMA-ES population size (lambda).")
    budget: int = Field(
        8000, ge=1, le=1_000_000, description="CMA-ES candidate evaluations; each scores the whole training set."
    )
    sigma: float = Field(1.0, gt=0.0, le=100.0, description="CMA-ES initial step size.")
    alpha: float = Field(1.0, gt=0.0, le=100.0, description="Scale of the random projection A.")
    bound: float = Field(0.0, ge=0.0, description="Box bound on z (0: unbounded).")
    loss: Literal["ce", "hinge"] = Field("ce", description="Training loss over the verbalizer log-probs.")
    eval_every: int = Field(100, ge=1, description="Candidate evaluations between model selections on dev.")
    budget2: int = Field(0, ge=0, le=100_000, description="BBT-RGB stage 2: COBYLA evaluations after CMA-ES (0: off).")
    cobyla_rhobeg: float = Field(0.5, gt=0.0, le=100.0, description="COBYLA initial trust-region radius.")
    train_subset: int | None = Field(
        None, ge=1, description="Score on a fixed, seeded subset of this many training examples (None: all)."
    )
    demonstrations: int = Field(
        0,
        ge=0,
        le=64,
        description="BBT-RGB's mixed initialisation: this many training examples (labels in turn, seeded) follow the "
        "instruction as demonstrations, and the soft prompt starts from that hard prompt (0: the instruction alone).",
    )
    demonstration_chars: int = Field(
        200, ge=1, le=20_000, description="A demonstration's input is cut to this many characters."
    )


class BbtV2Params(BbtParams):
    insertion: Literal["add", "prepend"] = Field(
        "add",
        description="add: vectors added to the instruction's tokens' hidden states at every layer (all z = 0 is "
        "the manual prompt); prepend: key/value prefixes at every layer (a zero prefix is not a no-op).",
    )
    # The authors' recommended BBTv2 command: sigma 0.2, alpha 0.2.
    sigma: float = Field(
        0.2, gt=0.0, le=100.0, description="CMA-ES initial step size (layer 0; every layer unless `sigma2` is set)."
    )
    alpha: float = Field(0.2, gt=0.0, le=100.0, description="Scale of the random projections A_l.")
    sigma2: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="BBT-RGB: CMA-ES initial step size of the layers after layer 0 (null: `sigma` everywhere).",
    )
    sigma_schedule: Literal["step", "linear", "exp"] = Field(
        "step",
        description="With `sigma2`, the step size of layer l >= 1: step: sigma2; linear: from sigma at layer 0 to "
        "sigma2 at the last layer; exp: sigma2 + (sigma - sigma2) * exp(-l / 5).",
    )


def layer_sigmas(sigma: float, sigma2: float | None, schedule: str, num_layers: int) -> list[float]:
    """Each layer's CMA-ES initial step size (BBT-RGB's `sigma_setting`: bbt2 = step, lin, exp)."""
    if sigma2 is None:
        return [sigma] * num_layers
    out = [sigma]
    for layer in range(1, num_layers):
        if schedule == "step":
            out.append(sigma2)
        elif schedule == "linear":
            out.append(sigma - (sigma - sigma2) * layer / (num_layers - 1))
        else:
            out.append(sigma2 + (sigma - sigma2) * math.exp(-layer / 5))
    return out


_PAPER = {"prompt_length": 50, "intrinsic_dim": 500, "popsize": 20, "budget": 8000, "sigma": 1.0, "alpha": 1.0}
# For the 135M CPU model: one benchmark run in under 10 minutes on 2 cores.
_SMALL = {"prompt_length": 5, "intrinsic_dim": 50, "popsize": 8, "budget": 96, "eval_every": 16, "train_subset": 20}
_PAPER_V2 = {**_PAPER, "sigma": 0.2, "alpha": 0.2}
_SMALL_V2 = {**_SMALL, "popsize": 4, "budget": 120, "eval_every": 40, "sigma": 0.2, "alpha": 0.2, "train_subset": 14}
# BBT-RGB's run script (budget 8000, sigma1 1, sigma2 0.2, alpha 0.5) with its options on: the additive form (its
# cat_or_add), one demonstration after the instruction, and COBYLA after CMA-ES for 6000 evaluations (the stage-2
# results directory its script names; the script's own budget2 is 0). Verbalizer ensembles are the task's.
_RGB = {**_PAPER, "insertion": "add", "alpha": 0.5, "budget2": 6000, "demonstrations": 1}
_RGB_V2 = {**_RGB, "sigma": 1.0, "sigma2": 0.2, "sigma_schedule": "step"}


def loss_and_accuracy(logprobs: list[list[float]], gold: list[int], loss: str) -> tuple[float, float]:
    """Mean loss and accuracy over examples, from each example's verbalizer log-probs."""
    lp = np.asarray(logprobs, dtype=np.float64)
    y = np.asarray(gold)
    rows = np.arange(len(y))
    correct = lp[rows, y]
    if loss == "ce":
        top = lp.max(axis=1, keepdims=True)
        logsumexp = top[:, 0] + np.log(np.exp(lp - top).sum(axis=1))
        per_example = logsumexp - correct
    else:
        margins = np.maximum(0.0, lp - correct[:, None] + HINGE_MARGIN)
        margins[rows, y] = 0.0
        per_example = margins.sum(axis=1)
    accuracy = float((lp.argmax(axis=1) == y).mean())
    return float(per_example.mean()), accuracy


class _BlackBoxTuning(Optimizer):
    """What BBT and BBTv2 share: the scoring set, losses, candidates with artifacts, COBYLA, selection cadence."""

    params: BbtParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.LABEL_LOGPROBS})
    subset_purpose: ClassVar[int] = 411

    def __init__(self, params: BbtParams, seed: int) -> None:
        super().__init__(params, seed)
        self.evaluations = 0  # candidate evaluations so far (the paper's "API calls")
        self.scale: dict[str, Any] | None = None  # model geometry and projection stds, measured in step 0
        self.model_id: str | None = None
        self.instruction = ""  # the hard prompt: the initial prompt, and with `demonstrations` the demonstrations

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> list[tuple[list[str], str]]:
        return label_task_problems(task, "soft prompts are trained on label log-probs")

    @classmethod
    def prompt_extras(cls, params: MethodParams, task: Task, seed: int) -> tuple[str, str]:
        """With `demonstrations` the initial and the best prompt both carry them after the instruction."""
        count = getattr(params, "demonstrations", 0)
        if not count:
            return "", ""
        train = task.split_examples("train")
        positions = pick_demonstrations([ex.target for ex in train], task.labels or [], count, seed)
        chars = getattr(params, "demonstration_chars", None)
        block = compose("", [render_demonstration(task, train[i], chars) for i in positions], "instruction_first")
        return block, block

    @classmethod
    def text_candidate(cls, details: dict[str, Any]) -> bool:
        return False  # its candidates are described, not given, by their text

    @classmethod
    def prompt_from_artifact(cls, artifact: dict[str, Any]) -> SoftPrompt:
        return soft_prompt_from_artifact(artifact)

    @staticmethod
    def scoring_set_size(params: MethodParams, n_train: int) -> int:
        # The demonstrations are not scored (at most `demonstrations` of them: fewer on a small split).
        return Optimizer.scoring_set_size(params, max(1, n_train - getattr(params, "demonstrations", 0)))

    # -- shared state -----------------------------------------------------------------------------------

    def _common_state(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "scale": self.scale,
            "model_id": self.model_id,
            "instruction": self.instruction,
        }

    def _load_common(self, state: dict[str, Any]) -> None:
        self.evaluations = state["evaluations"]
        self.scale = state["scale"]
        self.model_id = state["model_id"]
        self.instruction = state["instruction"]

    # -- mixed initialisation -----------------------------------------------------------------------------

    def demonstration_positions(self, ctx: OptimizerContext) -> list[int]:
        """Positions (in the train split) of the demonstrations, in the order shown; none without `demonstrations`."""
        if not self.params.demonstrations:
            return []
        task = ctx.evaluator.task
        targets = [ex.target for ex in task.split_examples("train")]
        return pick_demonstrations(targets, task.labels or [], self.params.demonstrations, self.seed)

    def hard_prompt(self, ctx: OptimizerContext) -> str:
        """The text the soft prompt starts from: the initial prompt, followed by the demonstrations if any."""
        task = ctx.evaluator.task
        train = task.split_examples("train")
        shown = [
            render_demonstration(task, train[i], self.params.demonstration_chars)
            for i in self.demonstration_positions(ctx)
        ]
        return compose(ctx.initial_prompt, shown, layout="instruction_first")

    def start_name(self) -> str:
        k = self.params.demonstrations
        return f"manual prompt with {k} demonstration{'s' if k != 1 else ''}" if k else "manual prompt"

    def scoring_examples(self, ctx: OptimizerContext) -> list[Example]:
        """The scoring set, as every method's, but never a demonstration: the train split without them, or a
        seeded subset of that. Without demonstrations it is the usual one."""
        train = ctx.evaluator.task.split_examples("train")
        if self.scoring_positions is None:
            shown = set(self.demonstration_positions(ctx))
            pool = [i for i in range(len(train)) if i not in shown]
            if not pool:
                raise ValueError("no training examples are left to score: every one is a demonstration")
            picked = subset_positions(len(pool), self.params.train_subset, self.seed, self.subset_purpose)
            self.scoring_positions = [pool[i] for i in picked]
        return [train[i] for i in self.scoring_positions]

    # -- scoring ----------------------------------------------------------------------------------------

    async def losses(self, ctx: OptimizerContext, prompts: list, examples: list[Example]) -> list[tuple[float, float]]:
        """(loss, accuracy) of each prompt on `examples`, all prompts in one batch."""
        labels = ctx.evaluator.task.labels or []
        gold = [labels.index(ex.target) for ex in examples]
        per_prompt = await ctx.evaluator.label_logprobs(prompts, examples)
        return [loss_and_accuracy(lp, gold, self.params.loss) for lp in per_prompt]

    async def score_initial(self, ctx: OptimizerContext, examples: list[Example]) -> CandidateResult:
        if not ctx.evaluator.uses_label_logprobs:
            raise ValueError("BBT needs a label task scored by label log-probs (metric label_accuracy with labels)")
        self.instruction = self.hard_prompt(ctx)
        if self.params.insertion == "add" and not self.instruction.strip():
            raise ValueError("the additive soft prompt needs an initial prompt: its tokens are the placeholders")
        self.model_id = ctx.evaluator.llm.info.model_id
        ((loss, accuracy),) = await self.losses(ctx, [self.instruction], examples)
        details: dict[str, Any] = {"loss": round(loss, 6), "origin": "initial"}
        if self.params.demonstrations:
            details["demonstrations"] = self.demonstration_positions(ctx)
        return CandidateResult(self.instruction, accuracy, 0, details)

    def artifact(self, z: Any) -> dict[str, Any]:
        assert self.scale is not None
        return {
            "version": ARTIFACT_VERSION,
            "method": self.method,
            "model_id": self.model_id,
            "geometry": self.scale["geometry"],
            "projection_seed": self.seed,
            "prompt_length": self.params.prompt_length,
            "intrinsic_dim": self.params.intrinsic_dim,
            "alpha": self.params.alpha,
            "sigma": self.params.sigma,
            "insertion": self.params.insertion,
            **({"placeholder": "instruction"} if self.params.insertion == "add" else {}),
            **{k: v for k, v in self.scale.items() if k in ("std", "stds")},
            "z": z,
            "text": self.instruction,  # with demonstrations: the instruction and them (only what rebuilds it)
            **({"demonstrations": self.params.demonstrations} if self.params.demonstrations else {}),
        }

    def candidate(self, artifact: dict, prompt: SoftPrompt, loss: float, accuracy: float, step: int, **details):
        return CandidateResult(
            prompt.description,
            accuracy,
            step,
            {"loss": round(loss, 6), **details},
            artifact=artifact,
            scoring_prompt=prompt,
        )

    def report(self, step: int, candidates: list[CandidateResult], message: str, evaluated: int, last: bool):
        before = self.evaluations
        self.evaluations += evaluated
        crossed = before // self.params.eval_every != self.evaluations // self.params.eval_every
        leader = min(range(len(candidates)), key=lambda i: candidates[i].details["loss"]) if candidates else None
        return StepReport(step, candidates, message=message, leader=leader, select=crossed or last)

    async def cobyla(
        self, x0: np.ndarray, evaluations: int, rhobeg: float, evaluate
    ) -> list[tuple[np.ndarray, float, Any]]:
        """COBYLA from x0 for at most `evaluations` loss evaluations; returns every (x, loss, extra) it tried.

        SciPy's COBYLA calls the loss synchronously, so it runs on a thread and each call awaits the (batched,
        cached, metered) evaluation on the event loop. A resumed job replays the same calls from the cache."""
        from scipy.optimize import minimize

        loop = asyncio.get_running_loop()
        tried: list[tuple[np.ndarray, float, Any]] = []
        stop = threading.Event()

        class _Spent(Exception):
            pass

        def objective(x: np.ndarray) -> float:
            if stop.is_set() or len(tried) >= evaluations:
                raise _Spent
            loss, extra = asyncio.run_coroutine_threadsafe(evaluate(np.array(x)), loop).result()
            tried.append((np.array(x), loss, extra))
            return loss

        def run() -> None:
            try:
                with warnings.catch_warnings():
                    # "Invalid MAXFUN": a budget under d + 2 is fine, the objective enforces it.
                    warnings.simplefilter("ignore")
                    minimize(objective, x0, method="COBYLA", options={"maxiter": evaluations, "rhobeg": rhobeg})
            except _Spent:
                pass

        try:
            await asyncio.to_thread(run)
        except BaseException:
            stop.set()
            raise
        return tried


class Bbt(_BlackBoxTuning):
    """BBT: CMA-ES over a soft prompt at the input layer, in a random low-dimensional subspace."""

    method: ClassVar[str] = "bbt"
    params_model: ClassVar[type[MethodParams]] = BbtParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.LABEL_LOGPROBS, Capability.INPUT_EMBEDDINGS})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER, "small": _SMALL, "bbt_rgb": _RGB}

    def __init__(self, params: BbtParams, seed: int) -> None:
        super().__init__(params, seed)
        self.search: CmaSearch | None = None
        self.search_state: dict | None = None
        self.z: list[float] | None = None  # current best z (CMA-ES, then COBYLA)
        self._projection: np.ndarray | None = None

    @property
    def generations(self) -> int:
        return max(1, self.params.budget // self.params.popsize)

    @property
    def total_steps(self) -> int:
        return self.generations + (1 if self.params.budget2 > 0 else 0)

    @classmethod
    def expected_calls(cls, params: BbtParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        s, p = cls.scoring_set_size(params, n_train), params
        evaluations = max(1, p.budget // p.popsize) * p.popsize
        selections = 1 + evaluations // p.eval_every + 1 + (1 if p.budget2 else 0)
        return s + (evaluations + p.budget2) * s + selections * n_dev

    def _state(self) -> dict[str, Any]:
        search_state = self.search.state_dict() if self.search is not None else self.search_state
        return {**self._common_state(), "search": search_state, "z": self.z}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._load_common(state)
        self.search_state = state["search"]
        self.search = None
        self.z = state["z"]

    def _settings(self) -> CmaSettings:
        p = self.params
        return CmaSettings(
            dim=p.intrinsic_dim, sigma=p.sigma, popsize=p.popsize, seed=self.seed, key=(0,), bound=p.bound
        )

    def _search(self) -> CmaSearch:
        if self.search is None:
            if self.search_state is None:
                self.search = CmaSearch(self._settings())
            else:
                self.search = CmaSearch.restore(self._settings(), self.search_state)
        return self.search

    def soft_prompt(self, z: np.ndarray) -> tuple[dict, SoftPrompt]:
        assert self.scale is not None
        p = self.params
        if self._projection is None:
            hidden = self.scale["geometry"]["hidden_size"]
            self._projection = input_projection(self.seed, p.intrinsic_dim, p.prompt_length, hidden, self.scale["std"])
        vectors = project(z, self._projection).reshape(p.prompt_length, -1)
        artifact = self.artifact([float(v) for v in z])
        if p.insertion == "add":
            prefix = ContinuousPrefix.of(PrefixKind.INPUT_ADD, vectors, anchor=self.instruction)
        else:
            prefix = ContinuousPrefix.of(PrefixKind.INPUT, vectors)
        return artifact, SoftPrompt(describe(artifact), self.instruction, prefix)

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        examples = self.scoring_examples(ctx)
        p = self.params
        initial = await self.score_initial(ctx, examples)
        # The std first: an HTTP backend knows its hidden size once it has read the embedding matrix.
        std = projection_std(p.alpha, await ctx.evaluator.llm.embedding_std(), p.intrinsic_dim, p.sigma)
        geometry = await ctx.evaluator.llm.model_geometry()
        self.scale = {"geometry": geometry, "std": std}
        message = f"{self.start_name()} scored on {len(examples)} examples; A std {std:.3g}"
        return StepReport(0, [initial], message=message)

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        examples = self.scoring_examples(ctx)
        p = self.params
        if step <= self.generations:
            search = self._search()
            population = search.ask()
            made = [self.soft_prompt(z) for z in population]
            scored = await self.losses(ctx, [sp for _, sp in made], examples)
            search.tell(population, [loss for loss, _ in scored])
            self.z = [float(v) for v in search.best_x]
            candidates = [
                self.candidate(artifact, sp, loss, acc, step, generation=step)
                for (artifact, sp), (loss, acc) in zip(made, scored, strict=True)
            ]
            message = f"generation {step}/{self.generations}: best loss {min(loss for loss, _ in scored):.4f}"
            return self.report(step, candidates, message, len(population), last=step == self.generations)

        # Stage 2: COBYLA from the best z so far.
        async def evaluate(x: np.ndarray):
            artifact, sp = self.soft_prompt(x)
            ((loss, acc),) = await self.losses(ctx, [sp], examples)
            return loss, (artifact, sp, acc)

        tried = await self.cobyla(np.asarray(self.z, dtype=np.float64), p.budget2, p.cobyla_rhobeg, evaluate)
        candidates = [self.candidate(a, sp, loss, acc, step, stage="cobyla") for _, loss, (a, sp, acc) in tried]
        if tried:
            x, loss, _ = min(tried, key=lambda t: t[1])
            if loss < self._search().best_loss:
                self.z = [float(v) for v in x]
        return self.report(step, candidates, f"COBYLA: {len(tried)} evaluations", len(tried), last=True)


class BbtV2(_BlackBoxTuning):
    """BBTv2: CMA-ES over key/value prefixes at every layer, one subspace and one search per layer, swept."""

    method: ClassVar[str] = "bbtv2"
    params_model: ClassVar[type[MethodParams]] = BbtV2Params
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.LABEL_LOGPROBS, Capability.DEEP_PROMPT})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER_V2, "small": _SMALL_V2, "bbt_rgb": _RGB_V2}

    def __init__(self, params: BbtParams, seed: int) -> None:
        super().__init__(params, seed)
        self.searches: dict[int, CmaSearch] = {}
        self.search_states: dict[str, dict] = {}
        self.z: list[list[float] | None] = []  # per layer: current best z (None: not searched yet, zero prefix)
        # Train loss of the current combination (every layer at its z); a layer's z changes only to beat it.
        self.loss: float | None = None
        self._layer_cache: dict[int, np.ndarray] = {}

    # Before step 0 the number of layers is unknown: count as if there were one (an upper bound).
    @property
    def num_layers(self) -> int:
        return int(self.scale["geometry"]["num_layers"]) if self.scale else 1

    @property
    def rounds(self) -> int:
        return max(1, self.params.budget // (self.params.popsize * self.num_layers))

    @property
    def total_steps(self) -> int:
        stage2 = self.num_layers if self.params.budget2 > 0 else 0
        return self.rounds * self.num_layers + stage2

    @classmethod
    def expected_calls(cls, params: BbtParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        s, p = cls.scoring_set_size(params, n_train), params
        evaluations = max(1, p.budget // (p.popsize * num_layers)) * num_layers * p.popsize
        stage2 = num_layers * max(1, p.budget2 // num_layers) if p.budget2 else 0
        selections = 1 + evaluations // p.eval_every + 1 + (1 if p.budget2 else 0)
        return s + (evaluations + stage2) * s + selections * n_dev

    def _state(self) -> dict[str, Any]:
        searches = dict(self.search_states)
        searches.update({str(layer): s.state_dict() for layer, s in self.searches.items()})
        return {**self._common_state(), "searches": searches, "z": self.z, "loss": self.loss}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._load_common(state)
        self.search_states = dict(state["searches"])
        self.searches = {}
        self.z = state["z"]
        self.loss = state.get("loss")  # None (also in older checkpoints): any sample is taken
        self._layer_cache = {}

    def layer_sigma(self, layer: int) -> float:
        p = self.params
        return layer_sigmas(p.sigma, p.sigma2, p.sigma_schedule, self.num_layers)[layer]

    def _search(self, layer: int) -> CmaSearch:
        if layer not in self.searches:
            p = self.params
            settings = CmaSettings(
                dim=p.intrinsic_dim,
                sigma=self.layer_sigma(layer),
                popsize=p.popsize,
                seed=self.seed,
                key=(1 + layer,),
                bound=p.bound,
            )
            saved = self.search_states.pop(str(layer), None)
            self.searches[layer] = CmaSearch.restore(settings, saved) if saved else CmaSearch(settings)
        return self.searches[layer]

    def _layer(self, layer: int, z: np.ndarray | list[float] | None) -> np.ndarray:
        assert self.scale is not None
        zero = np.zeros(self.params.intrinsic_dim)
        if self.params.insertion == "add":
            hidden = self.scale["geometry"]["hidden_size"]
            z = zero if z is None else np.asarray(z)
            return hidden_layer_vectors(
                self.seed, layer, z, self.params.prompt_length, hidden, self.scale["stds"][layer]
            )
        key_std, value_std = self.scale["stds"][layer]
        return layer_vectors(
            self.seed,
            layer,
            zero if z is None else np.asarray(z),
            self.scale["geometry"],
            self.params.prompt_length,
            key_std,
            value_std,
        )

    def _current(self, layer: int) -> np.ndarray:
        if layer not in self._layer_cache:
            self._layer_cache[layer] = self._layer(layer, self.z[layer])
        return self._layer_cache[layer]

    def soft_prompt(self, layer: int, z: np.ndarray) -> tuple[dict, SoftPrompt]:
        stack = np.stack([self._current(i) if i != layer else self._layer(layer, z) for i in range(self.num_layers)])
        zs = [([0.0] * self.params.intrinsic_dim if v is None else v) for v in self.z]
        zs[layer] = [float(v) for v in z]
        artifact = self.artifact(zs)
        if self.params.insertion == "add":
            prefix = ContinuousPrefix.of(PrefixKind.DEEP_ADD, stack, anchor=self.instruction)
        else:
            prefix = ContinuousPrefix.of(PrefixKind.DEEP, stack)
        return artifact, SoftPrompt(describe(artifact), self.instruction, prefix)

    def _set_layer(self, layer: int, z: np.ndarray) -> None:
        self.z[layer] = [float(v) for v in z]
        self._layer_cache.pop(layer, None)

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        examples = self.scoring_examples(ctx)
        p = self.params
        initial = await self.score_initial(ctx, examples)
        geometry = await ctx.evaluator.llm.model_geometry()
        # Per-layer statistics over the scoring inputs as the model sees them (manual prompt): of the hidden
        # states the additive form changes, or of the keys/values the prefix form stands beside.
        texts = [ctx.evaluator.render(self.instruction, ex) for ex in examples]
        if p.insertion == "add":
            hidden = await ctx.evaluator.llm.hidden_statistics(texts)
            stds = [projection_std(p.alpha, h, p.intrinsic_dim, p.sigma) for h in hidden]
        else:
            kv = await ctx.evaluator.llm.kv_statistics(texts)
            stds = [
                [
                    projection_std(p.alpha, k, p.intrinsic_dim, p.sigma),
                    projection_std(p.alpha, v, p.intrinsic_dim, p.sigma),
                ]
                for k, v in kv
            ]
        self.scale = {"geometry": geometry, "stds": stds}
        self.z = [None] * int(geometry["num_layers"])
        # The add form's all-zero start is the manual prompt; the prefix form's zero prefix is not, so there the
        # first layer's best sample is taken whatever its loss.
        self.loss = initial.details["loss"] if p.insertion == "add" else None
        return StepReport(0, [initial], message=f"{self.start_name()} scored on {len(examples)} examples")

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        examples = self.scoring_examples(ctx)
        p = self.params
        index = step - 1
        sweep_steps = self.rounds * self.num_layers
        if index < sweep_steps:
            round_, layer = divmod(index, self.num_layers)
            search = self._search(layer)
            population = search.ask()
            made = [self.soft_prompt(layer, z) for z in population]
            scored = await self.losses(ctx, [sp for _, sp in made], examples)
            search.tell(population, [loss for loss, _ in scored])
            # Keep the layer's sample only if it beats the current combination: a fresh layer search's first
            # best is merely the best of `popsize` random draws, and a stale one was found beside other layers.
            i = min(range(len(scored)), key=lambda j: scored[j][0])
            if self.loss is None or scored[i][0] < self.loss:
                self.loss = scored[i][0]
                self._set_layer(layer, population[i])
            candidates = [
                self.candidate(artifact, sp, loss, acc, step, round=round_ + 1, layer=layer)
                for (artifact, sp), (loss, acc) in zip(made, scored, strict=True)
            ]
            best_loss = min(loss for loss, _ in scored)
            message = f"round {round_ + 1}/{self.rounds}, layer {layer}: best loss {best_loss:.4f}"
            return self.report(step, candidates, message, len(population), last=index == sweep_steps - 1)

        # Stage 2: one COBYLA run per layer, from that layer's best z, the others held.
        layer = index - sweep_steps
        per_layer = max(1, p.budget2 // self.num_layers)

        async def evaluate(x: np.ndarray):
            artifact, sp = self.soft_prompt(layer, x)
            ((loss, acc),) = await self.losses(ctx, [sp], examples)
            return loss, (artifact, sp, acc)

        start = np.asarray(self.z[layer] or np.zeros(p.intrinsic_dim), dtype=np.float64)
        tried = await self.cobyla(start, per_layer, p.cobyla_rhobeg, evaluate)
        candidates = [
            self.candidate(a, sp, loss, acc, step, stage="cobyla", layer=layer) for _, loss, (a, sp, acc) in tried
        ]
        if tried:
            x, loss, _ = min(tried, key=lambda t: t[1])
            if loss < tried[0][1]:  # the first evaluation is the starting point itself
                self._set_layer(layer, x)
                self.loss = loss
        last = layer == self.num_layers - 1
        return self.report(step, candidates, f"COBYLA layer {layer}: {len(tried)} evaluations", len(tried), last)

"""Your own reward function: a scorer given as "pkg.module:function" where a registered scorer's name goes
(`reward.train`, `reward.gold`, `async-rlhf serve-reward`), in one of two forms:

* `fn(prompt, text) -> float`, called once per completion: `prompt.text` is the prompt as the policy saw it and
  `prompt.meta` its data (a dataset's `reference` and `meta_columns`, the embedded tasks' `answer`, and under
  `CONVERSATION` the turns of a prompt that came as a conversation); `text` is the completion, decoded without
  special tokens;
* TRL's form (GRPOTrainer's `reward_funcs`), any function with a parameter named `completions`, called once per
  batch by keyword as TRL calls it: `prompts`, `completions`, `completion_ids` (the completions' token ids, where
  the caller has them) and each `prompt.meta` key as a list with one value per completion (TRL passes a
  dataset's columns the same way), each only where the function takes it. A dataset's prompts carry the columns
  the run's functions take (`columns_taken`: those they name, every one where one takes **kwargs). A prompt
  that came as a conversation (TRL's conversational form) is given as its turns and its completion as
  `[{"role": "assistant", "content": text}]`, as TRL gives them; a plain one as texts.
  A reward function written for TRL works as it is.

Either may be `async def` (a judge behind a network call): it is awaited in the scoring thread, and a
per-completion one's calls for a batch run at once (ConcurrentReward).

Either is called in the process that scores (the generator's call, the reward actor, the reward server) and
returns numbers, higher is better. An exception, a non-finite value or anything that is not a number marks the
completion's reward failed, with the reason, never 0 (reward_models/service.py); `reward.max_failed_steps`
steps in a row without a usable reward stop the run. In a weighted sum of several (CombinedReward), `None` from
one of them means "does not apply" as in TRL: the others' sum is the reward.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from typing import Any, Callable

from async_rlhf.rollout import CONVERSATION, Prompt, RewardColumns
from async_rlhf.user_code import UserCodeError, check_signature, is_import_path, load_function
from reward_models.rules import SCORERS, Scorer
from reward_models.trl_context import NO_RUN, TRL_CONTEXT, ScoringCall

ARGUMENTS = ("prompt", "text")
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", *TRL_CONTEXT)  # what TRL passes besides the columns
NONE_APPLIES = "every reward of the sum returned None: none applies to this completion"
# What a user's function raises as its own failure: `sys.exit()` too, and KeyboardInterrupt, which in a scoring
# thread is never a Ctrl-C (a signal reaches the main thread only). Uncaught, either ended the scoring thread
# silently and its batch was said to have timed out.
USER_RAISES = (Exception, SystemExit, KeyboardInterrupt)


class BatchedReward:
    """A TRL-style reward function, called once per batch; `__call__` checks only the answer's shape (one value
    per completion): each value is checked as a single scorer's is."""

    def __init__(self, fn: Callable[..., Any], path: str) -> None:
        self.fn, self.path = fn, path
        parameters = inspect.signature(fn).parameters.values()
        self.any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
        named = [p for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.keywords = {p.name for p in named}
        self.required = {p.name for p in named if p.default is p.empty}

    def columns(self) -> RewardColumns:
        """The prompts' columns it takes: those it names, or every one where it takes **kwargs (as TRL gives)."""
        return RewardColumns(frozenset(self.keywords - set(TRL_ARGUMENTS)), self.any_keyword)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The parameters it requires that neither TRL's arguments nor the prompts' data (`keys`) give."""
        return sorted(self.required - set(TRL_ARGUMENTS) - set(keys))

    def __call__(self, prompts: list[Prompt], texts: list[str], token_ids: list[list[int]] | None = None,
                 call: ScoringCall | None = None) -> list[Any]:
        """The values for a batch; `call` is the run's state and takes what it logs (a fresh one where the caller
        has no run: the reward server, the TRL benchmark arm)."""
        context = self._context(call or ScoringCall(NO_RUN, 0))
        answer = awaited(self.fn(**self._arguments(prompts, texts, token_ids), **context))
        values = as_list(answer)
        if values is None or len(values) != len(texts):
            shown = f"{len(values)} values" if values is not None else type(answer).__name__
            raise TypeError(f"'{self.path}' returned {shown} for {len(texts)} completions; a batched reward returns "
                            "a list with one number per completion")
        return values

    def _arguments(self, prompts: list[Prompt], texts: list[str],
                   token_ids: list[list[int]] | None) -> dict[str, list[Any]]:
        """What TRL would pass, less what the function does not take."""
        keys = {key for p in prompts for key in p.meta} - {CONVERSATION, *TRL_CONTEXT}
        given: dict[str, list[Any]] = {key: [p.meta.get(key) for p in prompts] for key in keys}
        given.update(prompts=[trl_prompt(p) for p in prompts],
                     completions=[trl_completion(p, text) for p, text in zip(prompts, texts)])
        if token_ids is not None:
            given["completion_ids"] = token_ids
        if missing := sorted(self.required - set(given) - set(TRL_CONTEXT)):
            raise TypeError(f"'{self.path}' takes {', '.join(missing)}, which this batch does not give (its "
                            f"prompts' data: {', '.join(sorted(set(given) - set(TRL_ARGUMENTS))) or 'none'})")
        return {k: v for k, v in given.items() if self.any_keyword or k in self.keywords}

    def _context(self, call: ScoringCall) -> dict[str, Any]:
        return {k: v for k, v in call.arguments().items() if self.any_keyword or k in self.keywords}


class ConcurrentReward:
    """A per-completion reward function defined `async def` (a judge behind a network call): a batch's calls run
    at once, and each completion's exception is its own (in the list, where a number would be)."""

    def __init__(self, fn: Callable[..., Any], path: str) -> None:
        self.fn, self.path = fn, path

    def __call__(self, prompts: list[Prompt], texts: list[str], token_ids: list[list[int]] | None = None,
                 call: ScoringCall | None = None) -> list[Any]:
        """The values or exceptions for a batch (a per-completion function takes no ids and no run state)."""
        return asyncio.run(self._all(prompts, texts))

    async def _all(self, prompts: list[Prompt], texts: list[str]) -> list[Any]:
        return list(await asyncio.gather(*(self.fn(p, t) for p, t in zip(prompts, texts)), return_exceptions=True))


def as_list(answer: Any) -> list[Any] | None:
    """A batched reward's answer as a list: a list or tuple, and what TRL iterates as well (a numpy array, a 1-d
    tensor, a generator); None for a number, a string, a mapping, a 0-d array."""
    if isinstance(answer, (str, bytes, dict)) or getattr(answer, "ndim", 1) != 1:
        return None
    try:
        return list(answer)
    except TypeError:  # not iterable
        return None


def awaited(value: Any) -> Any:
    """The answer of a function defined `async def`: its coroutine run to the end here (in a scoring thread, which
    has no event loop of its own), as TRL awaits async reward functions."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def trl_prompt(prompt: Prompt) -> Any:
    """A prompt as TRL gives it to a reward function: its turns where it came as a conversation, else its text."""
    turns = prompt.meta.get(CONVERSATION)
    return turns if isinstance(turns, list) else prompt.text


def trl_completion(prompt: Prompt, text: str) -> Any:
    """A completion as TRL gives it: an assistant turn after a conversation, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt.meta.get(CONVERSATION), list) else text


class CombinedReward:
    """Several rewards summed with weights (`reward.train` as a list, TRL's `reward_weights`): a completion's
    reward is the weighted sum of the parts that apply to it (a part's None: it does not), and failed, naming
    the part, where one failed, or where none applies."""

    def __init__(self, parts: list[tuple[str, OneReward, float]]) -> None:
        self.parts = parts

    def __call__(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        """The sums for a batch (the TRL benchmark arm's use; a part's exception propagates)."""
        columns = [as_batch(part)(prompts, texts) for _, part, _ in self.parts]
        return [self.summed(values) for values in zip(*columns)]

    def summed(self, values: tuple[Any, ...]) -> float:
        """One completion's weighted sum of its parts' values, a part's None meaning "does not apply"."""
        applied = [weight * float(v) for (_, _, weight), v in zip(self.parts, values) if v is not None]
        if not applied:
            raise ValueError(NONE_APPLIES)
        return sum(applied)


ScorerSpec = str | list[tuple[str, float]]  # a name, or (name, weight) pairs to sum
OneReward = Scorer | BatchedReward | ConcurrentReward
AnyReward = OneReward | CombinedReward


def describe(spec: ScorerSpec) -> str:
    """How a line names a role's reward: "scorer 'name'", or "scorers 1 x 'a' + 0.5 x 'b'"."""
    if isinstance(spec, str):
        return f"scorer '{spec}'"
    return "scorers " + " + ".join(f"{w:g} x '{n}'" for n, w in spec)


def runs_user_code(spec: ScorerSpec) -> bool:
    """Whether a role's reward is, or sums, a function of the user's ("pkg.module:function")."""
    return any(is_import_path(name) for name in ([spec] if isinstance(spec, str) else [n for n, _ in spec]))


def resolve_scorer(spec: ScorerSpec, key: str) -> AnyReward:
    """The scorer a name gives, or the weighted sum of several (CombinedReward)."""
    if isinstance(spec, str):
        return resolve_one(spec, key)
    return CombinedReward([(name, resolve_one(name, key), weight) for name, weight in spec])


def resolve_one(name: str, key: str) -> OneReward:
    """The registered scorer `name`, or the user's function it names (BatchedReward in TRL's form,
    ConcurrentReward where it is `async def`);
    UserCodeError (one line, starting with `key`) for anything else."""
    if name in SCORERS:
        return SCORERS[name]
    if is_import_path(name):
        fn = load_function(name, key, None)
        if is_batched(fn):  # its other parameters are the prompts' columns, known only at the call
            return BatchedReward(fn, name)
        try:
            check_signature(fn, name, key, ARGUMENTS)
        except UserCodeError as exc:
            raise UserCodeError(f"{exc}; or, in TRL's form, take a parameter named completions") from None
        return ConcurrentReward(fn, name) if inspect.iscoroutinefunction(fn) else fn
    raise UserCodeError(f"{key}: unknown scorer '{name}'; valid: {', '.join(sorted(SCORERS))}, or "
                        f"'pkg.module:function' of your own (fn(prompt, text) -> float, or TRL's "
                        "fn(completions, **kwargs) -> list[float])")


def as_batch(scorer: AnyReward) -> Callable[[list[Prompt], list[str]], list[Any]]:
    """Any of them as one call over a batch, raising a completion's exception (the reward server's and the TRL
    benchmark arm's use)."""
    if isinstance(scorer, (BatchedReward, CombinedReward)):
        return scorer
    if isinstance(scorer, ConcurrentReward):
        return lambda prompts, texts: [raised(value) for value in scorer(prompts, texts)]
    return lambda prompts, texts: [scorer(p, t) for p, t in zip(prompts, texts)]


def raised(value: Any) -> Any:
    """`value`, unless it is an exception (a ConcurrentReward's answer for a completion): then it is raised."""
    if isinstance(value, BaseException):
        raise value
    return value


def batched_parts(scorer: AnyReward) -> list[BatchedReward]:
    """The functions in TRL's form in a scorer (itself, or the parts of a sum)."""
    parts = [part for _, part, _ in scorer.parts] if isinstance(scorer, CombinedReward) else [scorer]
    return [part for part in parts if isinstance(part, BatchedReward)]


def columns_taken(scorers: Iterable[AnyReward]) -> RewardColumns:
    """The dataset columns the functions in TRL's form among `scorers` take, all together."""
    wanted = [part.columns() for scorer in scorers for part in batched_parts(scorer)]
    return RewardColumns(frozenset().union(*(w.names for w in wanted)), any(w.every for w in wanted))


def is_batched(fn: Callable[..., Any]) -> bool:
    """TRL's form: it takes `completions` (TRL calls its reward functions by keyword)."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False

"""Reward functions: the registry of the run's rewards (``rollout.rewards``), the built-in strict math
reward, and what a failing reward function costs (the time-bounded calls themselves: `rollout.reward_calls`).

A reward function has TRL's ``reward_funcs`` signature, unchanged: ``fn(prompts, completions, **columns)
-> list[float | None]``, one value per completion (None: not applicable to that sample), called with
keywords only; ``async def`` functions too. relayrl calls it once per finished sample (lists of one) with
``prompts`` = the problem's question (the dataset's prompt text, before relayrl's instruction and chat
template), ``completions`` = the answer the environment scores, both as plain text (TRL's standard format)
or, with ``format = "conversational"``, as TRL's conversational message lists (``[{"role": "user", "content":
question}]``, or a conversational dataset's own prompt messages, and ``[{"role": "assistant", "content":
text}]``, what the functions of ``trl.rewards`` read), the reference answer as ``answer``, and every other
column of the problem's data row under its own name (``solution``, ``difficulty``, ...;
`buffer.Problem.columns`; a data column named ``answer`` wins over the reference). TRL's other keywords
(``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric``) are not passed.

The built-in ``exact_match``: the response must end its work with a line ``Answer: <value>`` (strict
parse); 1.0 when the parsed value equals the reference (numerically when both parse as numbers, else as
normalised strings, else by math-verify), 0.0 otherwise. ``correct`` (held-out accuracy, the
``rollout/correct_frac`` metric) is always that strict exact match, whatever rewards the run trains on.

Isolation: each call runs in a thread of this process, bounded by ``rollout.reward_timeout_s`` from the moment
a thread takes it up. A function that raises, times out, returns a non-finite value or the wrong number of
values fails that sample (kept, counted, never trained on); the worker goes on. A function that never returns
cannot be stopped: its thread stays busy for the worker's life (`hung_reward_calls` counts them; once all
``REWARD_THREADS`` hang, every later call fails as not started in time). An ``async`` function stuck at an
``await`` is cancelled at the deadline and frees its thread. A function that crashes or exits the interpreter
(a segfault in a C extension, ``os._exit``) takes the worker with it (Ray restarts the worker and the driver
re-issues its requests), unless its entry sets ``isolate = true``: it then runs in worker processes of its own
(`rollout.reward_isolation`), where a crash or a call past its budget (killed) fails that sample only and the
process is replaced.

Reward models and LLM judges run as actors of their own (`rollout.reward_models`): ``fn =
"reward_model:<name>"`` scores with the ``[[reward_models]]`` pool ``<name>``, and user functions call a pool
with ``rollout.reward_models.reward_model(name).score(...)``.

Left out on purpose: batching a request's samples into one reward-function call (the pools batch concurrent
calls themselves).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from base.user_code import import_object, is_import_path
from rollout.reward_calls import REWARD_THREADS, _Call, hung_reward_calls, score_safely  # noqa: F401 (re-exported)
from rollout.reward_isolation import RewardProcesses

if TYPE_CHECKING:
    from rollout.config import RewardConfig

_ANSWER_RE = re.compile(r"answer\s*[:：]\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The value after the last ``Answer:`` in ``text`` (stripped, trailing '.' removed), or None."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip().strip("$ ").rstrip(".").strip()
    return value or None


def _as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace(" ", ""))
    except ValueError:
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match: numeric equality (|a-b| <= 1e-6 * max(1, |b|)), then normalised string, then math-verify."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    if predicted.strip().lower() == reference.strip().lower():
        return True
    try:
        from math_verify import parse, verify

        # Off the main thread math-verify cannot use signal.alarm: disable its timeouts.
        gold = parse(reference, parsing_timeout=None)
        pred = parse(predicted, parsing_timeout=None)
        return bool(verify(gold, pred, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - an unparsable answer is simply wrong
        return False


def score_response(text: str, reference: str) -> tuple[float, bool]:
    """Return ``(reward, correct)`` for one response; reward is 1.0 iff the strict parse matches."""
    pred = extract_answer(text)
    correct = pred is not None and answers_match(pred, reference)
    return (1.0 if correct else 0.0), correct


# ---- the registry ------------------------------------------------------------------------------------------
RewardFn = Callable[..., Any]  # fn(prompts, completions, **columns) -> list[float | None] (or an awaitable of it)
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Function decorator: make ``fn`` the reward of ``rollout.rewards[].fn = name``.

    Raises:
        ValueError: ``name`` is registered already, or looks like an import path (has a ':').
    """
    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS or is_import_path(name):
            raise ValueError(f"reward name {name!r} is registered already or has a ':' (import paths name user code)")
        REWARDS[name] = fn
        return fn
    return add


@register_reward("exact_match")
def exact_match(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 for a completion whose last ``Answer:`` line matches its reference ``answer`` (`score_response`),
    else 0.0. A rollout worker does not call it: it reuses the strict check behind ``correct``
    (`RolloutWorker.reward_fn`), computed once per sample."""
    return [score_response(c, a)[0] for c, a in zip(completions, answer)]


def resolve_reward(fn: str, field: str = "rollout.rewards.fn") -> RewardFn:
    """The reward function ``fn`` names: a built-in (`REWARDS`), a reward-model pool ``"reward_model:<name>"``
    (`rollout.reward_models.reward_model_reward`) or user code ``"pkg.module:function"``.

    Raises:
        ValueError: one line naming ``fn``: unknown name, import failure, not a function.
    """
    if fn.startswith("reward_model:"):  # a [[reward_models]] pool (rollout.reward_models), reached at call time
        from rollout.reward_models import reward_model_reward

        return reward_model_reward(fn.partition(":")[2])
    if is_import_path(fn):
        obj = import_object(fn, field)
    elif fn in REWARDS:
        obj = REWARDS[fn]
    else:
        raise ValueError(f"{field} = {fn!r} is neither a built-in reward ({', '.join(sorted(REWARDS))}) nor an "
                         "import path 'pkg.module:function'")
    if isinstance(obj, type) or not callable(obj):
        raise ValueError(f"{field} = {fn!r} is a {type(obj).__name__}, not a function; name a function (or a "
                         "callable object) fn(prompts, completions, **kwargs) -> list[float | None]")
    return obj


def check_reward_signature(obj: RewardFn, fn: str, columns: Sequence[str] | None,
                           field: str = "rollout.rewards.fn") -> None:
    """Check that ``obj`` can be called as ``obj(prompts=..., completions=..., **columns)``.

    Args:
        columns: the column keywords it will get; None: not known yet (config load), so any further
            required parameter is taken for a column the data will hold.

    Raises:
        ValueError: one line naming ``fn``: no ``**kwargs`` (relayrl, like TRL, passes every column and may
            pass more), positional-only parameters, or a required parameter no column fills.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a C function without a signature: its first call tells
        return
    params = list(sig.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise ValueError(f"{field} = {fn!r}: its signature {sig} has no **kwargs; reward functions are called as "
                         "fn(prompts=..., completions=..., **columns) with every dataset column as a keyword (TRL's "
                         "reward_funcs signature): add **kwargs")
    positional = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional:
        raise ValueError(f"{field} = {fn!r}: its parameters {', '.join(positional)} are positional-only (signature "
                         f"{sig}); reward functions get every argument by keyword, as TRL calls them: drop the '/'")
    given = {"prompts", "completions", *(columns or ())}
    if columns is None:  # required parameters besides these are taken for columns the data will hold
        given |= {p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                   p.KEYWORD_ONLY)}
    try:
        sig.bind(**{k: [] for k in given})
    except TypeError as e:
        raise ValueError(f"{field} = {fn!r}: cannot be called as fn(prompts=..., completions=..., "
                         f"{''.join(f'{c}=..., ' for c in columns or ())}**other columns): {e} (its signature: "
                         f"{sig}); give that parameter a default, or name a column the data has "
                         "(data.answer_field)") from None


# ---- the run's rewards -------------------------------------------------------------------------------------
class Score(tuple):
    """What a `rollout.envs.base.Scorer` returns, the tuple ``(reward, correct, error)``, with each reward
    function's part beside it (environments unpack the three; `rollout.envs.builtin.answer_step` forwards the
    parts as ``StepResult.info["reward_terms"]`` / ``["reward_failed"]``).

    Attributes:
        terms: ``{reward name: value}`` of the functions that returned, unweighted; None: not applicable.
        failed: names of the functions that failed (raised, timed out, returned a bad value).
    """

    terms: dict[str, float | None]
    failed: tuple[str, ...]

    def __new__(cls, reward: float, correct: bool, error: str, terms: dict[str, float | None] | None = None,
                failed: Sequence[str] = ()) -> Score:
        self = super().__new__(cls, (reward, correct, error))
        self.terms, self.failed = dict(terms or {}), tuple(failed)
        return self

    def __getnewargs__(self) -> tuple:
        return (*self, self.terms, self.failed)

    reward = property(lambda self: self[0], doc="the weighted total (0.0 when a function failed)")
    correct = property(lambda self: self[1], doc="the strict exact match")
    error = property(lambda self: self[2], doc='why the sample failed; "" when it did not')


def _one_value(out: Any) -> float | None:
    """The single value of a reward function's output for one completion; raises ValueError if it is not one
    finite number or None."""
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise ValueError(f"returned {type(out).__name__}, not a list with one value per completion")
    values = list(out)
    if len(values) != 1:
        raise ValueError(f"returned {len(values)} values for 1 completion")
    v = values[0]
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"returned {values[0]!r}, not a number or None") from None
    if not math.isfinite(v):
        raise ValueError(f"returned a non-finite reward {v!r} (return None for 'not applicable')")
    return v


def reward_columns(data_cfg: Any) -> tuple[str, ...]:
    """The column keywords reward functions get besides ``prompts`` and ``completions``: ``answer`` and, for a
    dataset, every column of its rows but the prompt (`rollout.tasks.data_columns`, read on the driver)."""
    from rollout.tasks import data_columns

    return data_columns(data_cfg)


class RewardSet:
    """The run's reward functions (``rollout.rewards``), scoring one completion at a time.

    The sample's reward is ``sum(weight_i * r_i)`` over the functions that returned a value; a function
    returning None (not applicable) adds nothing, as TRL's nansum over reward functions (0.0 when none
    applies). When any function fails, the sample fails (`Score` error set, reward 0.0): kept and counted,
    never trained on. ``correct`` is the strict check ``check`` (the built-in exact match), run for every
    sample; the ``exact_match`` entries reuse its value instead of calling the function again. An entry with
    ``isolate = true`` runs in its own `RewardProcesses` pool (started on first use; `close` ends them).

    Args:
        rewards: the `RewardConfig` entries.
        timeout_s: budget of each call (``rollout.reward_timeout_s``).
        columns: column keywords the functions' signatures are checked against (`reward_columns`); None: not
            known here (a rollout worker, which never reads the data: the driver checked them), so any required
            parameter is taken for a column. `score` fills them from the problem's row.
        check: ``(text, reference) -> (reward, correct)``, the strict check (`RolloutWorker.reward_fn`).

    Raises:
        ValueError: a function that cannot be resolved or cannot be called with these columns (one line).
    """

    def __init__(self, rewards: Sequence[RewardConfig], timeout_s: float,
                 columns: Sequence[str] | None = ("answer",),
                 check: Callable[[str, str], tuple[float, bool]] = score_response) -> None:
        self.timeout_s, self.check = timeout_s, check
        self.columns = None if columns is None else tuple(columns)
        # (name, fn or None: the check's value, or its process pool (isolate), weight, conversational)
        self.entries: list[tuple[str, RewardFn | RewardProcesses | None, float, bool]] = []
        for i, r in enumerate(rewards):
            field = f"rollout.rewards[{i}].fn"
            fn = resolve_reward(r.fn, field)  # imported here too: its errors are one line, its signature checked
            if fn is not exact_match:
                check_reward_signature(fn, r.fn, self.columns, field)
            if r.isolate:
                fn = RewardProcesses(r.fn, r.processes, r.memory_limit_bytes)
            self.entries.append((r.name, None if fn is exact_match else fn, r.weight, r.format == "conversational"))

    def close(self) -> None:
        """End the processes of the isolated functions (a later `score` starts new ones)."""
        for _, fn, _, _ in self.entries:
            if isinstance(fn, RewardProcesses):
                fn.close()

    def score(self, prompt: str, completion: str, reference: str, columns: Mapping[str, Any] | None = None,
              messages: Sequence[Mapping[str, str]] = ()) -> Score:
        """Score one completion of ``prompt`` against ``reference``: every function runs concurrently, each
        within ``timeout_s`` of its start; never raises.

        Args:
            columns: the problem's data row but its prompt (`buffer.Problem.columns`), each column a keyword (a
                list of one, as TRL passes them); ``answer`` (and the checked columns the row lacks) get
                ``reference``; a row column of that name wins, as in TRL.
            messages: a conversational prompt's messages (`buffer.Problem.messages`): the ``prompts`` of
                conversational-format functions (default: ``prompt`` as one user message).
        """
        columns = {**{c: [reference] for c in self.columns or ("answer",)},
                   **{c: [v] for c, v in (columns or {}).items()}}
        standard = {"prompts": [prompt], "completions": [completion], **columns}
        conversational = {"prompts": [[dict(m) for m in messages] or [{"role": "user", "content": prompt}]],
                          "completions": [[{"role": "assistant", "content": completion}]], **columns}
        checked = _Call(self.check, (completion, reference), {}, self.timeout_s)
        calls = {name: _Call(fn, (), conversational if chat else standard, self.timeout_s)
                 for name, fn, _, chat in self.entries if fn is not None}
        (value, correct), check_error = self._check(checked)
        terms: dict[str, float | None] = {}
        errors: dict[str, str] = {}  # user functions that failed -> why
        for name, fn, _, _ in self.entries:
            if fn is None:  # exact_match: the check's value
                if not check_error:
                    terms[name] = value
                continue
            out, error = calls[name].result()
            if not error:
                try:
                    terms[name] = _one_value(out)
                except ValueError as e:
                    error = str(e)
            if error:
                errors[name] = error
        if check_error or errors:
            failed = [n for n, fn, _, _ in self.entries if (fn is None and check_error) or n in errors]
            why = "; ".join([check_error] * bool(check_error) + [f"reward {n!r} {e}" for n, e in errors.items()])
            return Score(0.0, False, why[:500], terms, failed)
        total = sum(w * terms[n] for n, _, w, _ in self.entries if terms[n] is not None)
        return Score(float(total), correct, "", terms, ())

    @staticmethod
    def _check(call: _Call) -> tuple[tuple[float, bool], str]:
        out, error = call.result()
        if error:
            return (0.0, False), error
        try:
            reward, correct = out
            if not math.isfinite(float(reward)):
                return (0.0, False), f"returned a non-finite reward {reward!r}"
        except (TypeError, ValueError) as e:
            return (0.0, False), f"returned {out!r}: {e}"[:300]
        return (float(reward), bool(correct)), ""

"""How many tokens to draft in each step: the cost model S = τ / (k·c + v), measured live.

One step with up to k drafted tokens costs, in units of one plain target step,
    draft forwards × c  +  v(n + 1)
(c: a draft forward over a target step; v(n + 1): a target pass over n + 1 tokens over a
one-token pass; n the tokens actually drafted, fewer than k when confidence stops the draft)
and yields the accepted drafted tokens plus one. The adaptive policy picks the k in 0..k_max
with the most expected tokens per unit of time; k = 0 is a plain decoding step, so a draft
that does not pay is simply not run.

Everything it needs is measured where it runs:
- `CostMeter`: seconds per target pass of n tokens and per draft forward, seeded by a short
  calibration at start-up and followed live (exponential moving averages of real steps; a
  draft forward that catches up on many tokens, as a probe's first one does, is not timed).
- `DraftStats`: per draft position j, how often position j was reached (all earlier tokens
  accepted and j < k), accepted, and how often the draft went on to propose it. Counted per
  request and engine-wide; a request's rates are shrunk towards the engine's, and the engine's
  towards the previous position's (deeper positions seen less often), so a new request starts
  from what the engine has learnt. Engine-wide counts decay, so the policy follows the workload.

Prompt lookup (`prompt_lookup.py`) is a second proposer that costs no forward pass: when it
finds a continuation, its k is weighed by the same formula with c = 0 and the lookup's own
acceptance counts, and the step goes to whichever proposer (or plain decoding) promises the
most tokens per unit of time.

When plain steps win, each proposer is probed once in a while (k = 1, with a back-off that
doubles after each probe that gains nothing), so a request whose text turns predictable is
noticed. The choice depends only on timings and on acceptance already observed, never on the
target's output for the step being decided, so decoding stays lossless under any policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SpeculationMode = Literal["adaptive", "fixed", "off"]

DEFAULT_CONFIDENCE_THRESHOLD = 0.3  # chosen by measurement: README, "Speculation that never loses"

PRIOR_ACCEPTANCE = 0.5  # position 0 before anything is observed: optimistic enough to explore
ENGINE_PRIOR_WEIGHT = 4.0  # pseudo-observations of the previous position's rate (engine-wide)
REQUEST_PRIOR_WEIGHT = 8.0  # pseudo-observations of the engine's rate (per request)
ENGINE_DECAY = 0.998  # engine-wide counts forget with a horizon of ~500 drafting steps
REQUEST_DECAY = 0.95  # a request's own with a horizon of ~20: its text can change character
PROBE_INTERVAL = 32  # plain steps before the first probe of a request (its draft prefill is dear)
MAX_PROBE_INTERVAL = 512
TIMING_EMA = 0.1  # weight of a new timing in the moving averages


@dataclass
class DraftStats:
    """Per draft position j: reached (j < k and all earlier tokens accepted), accepted, and
    proposed / offered (the draft went on to propose j when j < k and j - 1 was proposed)."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    offered: list[float] = field(default_factory=list)
    proposed: list[float] = field(default_factory=list)

    def _grow(self, length: int) -> None:
        for counts in (self.reached, self.accepted, self.offered, self.proposed):
            counts.extend([0.0] * (length - len(counts)))

    def record(self, k: int, num_drafted: int, num_accepted: int, weight: float = 1.0) -> None:
        """One step that allowed k tokens, drafted `num_drafted` and kept `num_accepted`.

        A position the draft declined to propose (confidence) counts as reached and rejected:
        the policy's expected tokens for k are then right whatever the draft's stopping rule."""
        if k == 0:
            return
        self._grow(k)
        for j in range(min(num_accepted + 1, k)):
            self.reached[j] += weight
            self.accepted[j] += weight if j < num_accepted else 0.0
        for j in range(1, min(num_drafted + 1, k)):
            self.offered[j] += weight
            self.proposed[j] += weight if j < num_drafted else 0.0

    def decay(self, factor: float) -> None:
        for counts in (self.reached, self.accepted, self.offered, self.proposed):
            for j in range(len(counts)):
                counts[j] *= factor


def _rates(
    successes: list[float], trials: list[float], priors: list[float] | float, weight: float,
    length: int,
) -> list[float]:
    """Shrunk rates (successes + weight·prior) / (trials + weight) per position; a scalar prior
    means "the previous position's rate" (the first position takes the scalar)."""
    rates: list[float] = []
    for j in range(length):
        if isinstance(priors, list):
            prior = priors[j]
        else:
            prior = rates[j - 1] if j else priors
        s = successes[j] if j < len(successes) else 0.0
        n = trials[j] if j < len(trials) else 0.0
        rates.append((s + weight * prior) / (n + weight))
    return rates


def expected_tokens(acceptance: list[float], k: int) -> float:
    """1 + Σ_{j<k} Π_{i≤j} β_i: tokens per step when β_i is position i's conditional acceptance."""
    total, run = 1.0, 1.0
    for j in range(k):
        run *= acceptance[j]
        total += run
    return total


@dataclass
class CostMeter:
    """Seconds per target pass of n tokens (index n - 1) and per draft forward."""

    target_pass_s: list[float] = field(default_factory=list)
    draft_forward_s: float | None = None

    def observe_target(self, num_tokens: int, seconds: float) -> None:
        if len(self.target_pass_s) < num_tokens:
            return  # only calibrated sizes are followed (k_max + 1 at most)
        old = self.target_pass_s[num_tokens - 1]
        self.target_pass_s[num_tokens - 1] = old + TIMING_EMA * (seconds - old)

    def observe_draft(self, num_forwards: int, seconds: float) -> None:
        if num_forwards == 0:
            return
        per_forward = seconds / num_forwards
        old = self.draft_forward_s
        self.draft_forward_s = per_forward if old is None else old + TIMING_EMA * (
            per_forward - old)

    @property
    def draft_cost_ratio(self) -> float | None:
        """c: one draft forward over one plain target step."""
        if not self.target_pass_s or self.draft_forward_s is None:
            return None
        return self.draft_forward_s / self.target_pass_s[0]

    def verify_cost_ratio(self, num_tokens: int) -> float | None:
        """v: a target pass over `num_tokens` tokens over a one-token pass."""
        if len(self.target_pass_s) < num_tokens:
            return None
        return self.target_pass_s[num_tokens - 1] / self.target_pass_s[0]


@dataclass
class Probe:
    """A proposer's probe back-off within one request."""

    passed_over: int = 0  # steps since it last drafted, while it could have
    interval: int = PROBE_INTERVAL
    probing: bool = False  # the current step is its probe

    def due(self) -> bool:
        """Count a step that passed the proposer over; True when it is time to probe it."""
        self.passed_over += 1
        if self.passed_over < self.interval:
            return False
        self.passed_over, self.probing = 0, True
        return True

    def learn(self, num_accepted: int) -> None:
        """After a step it drafted: a probe that gained nothing doubles the wait."""
        if self.probing:
            self.interval = (PROBE_INTERVAL if num_accepted
                             else min(self.interval * 2, MAX_PROBE_INTERVAL))
        self.passed_over, self.probing = 0, False


@dataclass
class RequestSpeculation:
    """What the policy keeps per request: its own acceptance counts and probe back-offs, for
    the draft model and for prompt lookup."""

    stats: DraftStats = field(default_factory=DraftStats)
    lookup_stats: DraftStats = field(default_factory=DraftStats)
    probe: Probe = field(default_factory=Probe)
    lookup_probe: Probe = field(default_factory=Probe)


@dataclass(frozen=True)
class Choice:
    """A step's plan: verify k proposed tokens, from prompt lookup or from the draft model."""

    k: int
    lookup: bool = False


class SpeculationPolicy:
    """Chooses k for each step: `fixed` (always k_max), `off` (always 0) or `adaptive`."""

    def __init__(self, mode: SpeculationMode, max_k: int):
        if max_k < 0:
            raise ValueError("max_k must be >= 0")
        self.mode: SpeculationMode = mode if max_k > 0 else "off"
        self.max_k = max_k
        self.costs = CostMeter()
        self.engine_stats = DraftStats()
        self.engine_lookup_stats = DraftStats()

    # -- estimates ----------------------------------------------------------------------------

    def acceptance(self, request: RequestSpeculation | None, lookup: bool = False) -> list[float]:
        """β_j: conditional acceptance per position of the draft model's (or, with `lookup`,
        prompt lookup's) proposals, for this request (or engine-wide)."""
        stats = self.engine_lookup_stats if lookup else self.engine_stats
        engine = _rates(stats.accepted, stats.reached, PRIOR_ACCEPTANCE, ENGINE_PRIOR_WEIGHT,
                        self.max_k)
        if request is None:
            return engine
        stats = request.lookup_stats if lookup else request.stats
        return _rates(stats.accepted, stats.reached, engine, REQUEST_PRIOR_WEIGHT, self.max_k)

    def continuation(self, request: RequestSpeculation | None) -> list[float]:
        """π_j: how often the draft, having proposed j - 1, proposes j (π_0 = 1)."""
        engine = _rates(self.engine_stats.proposed, self.engine_stats.offered, 1.0,
                        ENGINE_PRIOR_WEIGHT, self.max_k)
        engine[0] = 1.0
        if request is None:
            return engine
        rates = _rates(request.stats.proposed, request.stats.offered, engine,
                       REQUEST_PRIOR_WEIGHT, self.max_k)
        rates[0] = 1.0
        return rates

    def step_cost(self, k: int, continuation: list[float], c: float | None) -> float | None:
        """Expected cost of a step allowing k tokens, in plain target steps, when a draft
        forward costs c."""
        if c is None:
            return None
        if k == 0:
            return 1.0
        # P(drafted ≥ n) for n = 0..k: the draft proposes position j with probability π_j
        at_least = [1.0]
        for j in range(k):
            at_least.append(at_least[-1] * continuation[j])
        # forward j runs when positions 0..j-1 were proposed: P(drafted ≥ j)
        draft_forwards = sum(at_least[:k])
        verify = 0.0
        for n in range(k + 1):
            p_exactly = at_least[n] - (at_least[n + 1] if n < k else 0.0)
            v = self.costs.verify_cost_ratio(n + 1)
            if v is None:
                return None
            verify += p_exactly * v
        return draft_forwards * c + verify

    def expected_speedups(self, request: RequestSpeculation | None = None, lookup: bool = False,
                          max_k: int | None = None) -> list[float] | None:
        """Expected tokens per unit time for k = 0..max_k (default k_max) over plain decoding's
        (k = 0 → 1), for the draft model or (`lookup`) prompt lookup, which costs nothing to
        run and proposes every token it found."""
        acceptance = self.acceptance(request, lookup)
        continuation = [1.0] * self.max_k if lookup else self.continuation(request)
        c = 0.0 if lookup else self.costs.draft_cost_ratio
        speedups = []
        for k in range(self.max_k + 1 if max_k is None else max_k + 1):
            cost = self.step_cost(k, continuation, c)
            if cost is None:
                return None
            # a position the draft declines is counted as rejected, so expected tokens need
            # only the acceptance rates
            speedups.append(expected_tokens(acceptance, k) / cost)
        return speedups

    # -- the decision -------------------------------------------------------------------------

    def choose(self, request: RequestSpeculation, num_found: int = 0,
               drafting: bool = True) -> Choice:
        """The step's plan when prompt lookup found `num_found` tokens and a draft model is
        there (`drafting`): the proposer and k with the most expected tokens per unit of time;
        k = 0 is a plain step. `fixed` verifies what lookup found, else drafts k_max."""
        found = min(num_found, self.max_k)
        if self.mode == "off" or not (found or drafting):
            return Choice(0)
        if self.mode == "fixed":
            return Choice(found, lookup=True) if found else Choice(self.max_k)
        request.probe.probing = request.lookup_probe.probing = False
        lookup = self.expected_speedups(request, lookup=True, max_k=found) if found else [1.0]
        draft = self.expected_speedups(request) if drafting else [1.0]
        if lookup is None or draft is None:  # not calibrated yet: speculate, and measure
            return Choice(found, lookup=True) if found else Choice(self.max_k)
        best_lookup = max(range(len(lookup)), key=lambda k: (lookup[k], -k))
        best_draft = max(range(len(draft)), key=lambda k: (draft[k], -k))
        if best_lookup and lookup[best_lookup] >= draft[best_draft]:
            return Choice(best_lookup, lookup=True)
        if best_draft:
            return Choice(best_draft)
        if found and request.lookup_probe.due():
            return Choice(1, lookup=True)
        if drafting and request.probe.due():
            return Choice(1)
        return Choice(0)

    def record(self, request: RequestSpeculation, k: int, num_drafted: int,
               num_accepted: int, lookup: bool = False) -> None:
        """Learn from a step that allowed k tokens (drafted by prompt lookup with `lookup`)."""
        if k == 0:
            return
        (request.lookup_probe if lookup else request.probe).learn(num_accepted)
        for stats, decay in (
            (request.lookup_stats if lookup else request.stats, REQUEST_DECAY),
            (self.engine_lookup_stats if lookup else self.engine_stats, ENGINE_DECAY),
        ):
            stats.decay(decay)
            stats.record(k, num_drafted, num_accepted)

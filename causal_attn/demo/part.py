"""The skeleton every demo part fills in (:class:`Part`), and the demo's error type.

A part (``cat``, ``capt``, ``pretrained``) says what it shares between runs (:meth:`Part.make_setup`: data,
tokenizer, encoded records), what one run is (:meth:`Part.one_run`: train, score, probe one model), how a
finished run is printed (:meth:`Part.describe`) and what its runs add up to (:meth:`Part.summarize`: results,
figures, table). The control flow around them is here and in :mod:`.runner`, once for all parts.
"""
from __future__ import annotations

import statistics


class DemoError(ValueError):
    """A bad demo argument or input (``causal-attn demo`` prints it as a one-line error)."""


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


_SETUPS: dict = {}  # (part class, setup_key) -> setup, once per process (worker processes build their own)


class Part:
    """One demo part: ``methods`` x ``seeds`` runs of ``recipe``.

    The object travels to the worker processes (pickled without its setup and runs); each process builds the
    setup once per :meth:`setup_key`. Subclasses set :attr:`name` and :attr:`methods` and fill in
    :meth:`make_setup`, :meth:`one_run`, :meth:`describe` and :meth:`summarize`; :meth:`tasks`,
    :meth:`saved` and :meth:`save` are there for parts that add runs or resume from a log."""

    name = ""
    methods: tuple = ()
    seconds_per_step = 0.001   # a run's estimated seconds per record-step: the pool starts the longest runs first
    default_seeds = 3          # seeds trained when ``--seeds`` is not given
    first_seed = 0             # the first of them (a part whose recipe search trained seed 0 starts past it)

    def __init__(self, recipe, seeds: list[int]):
        self.recipe = recipe
        self.seeds = list(seeds)
        self.runs: dict[str, list[dict]] = {m: [] for m in self.methods}

    # ------------------------------------------------------------------ filled in by each part
    def setup_key(self) -> tuple:
        """What the setup depends on (the arguments of :meth:`make_setup`)."""
        return ()

    def make_setup(self):
        raise NotImplementedError

    def one_run(self, method: str, seed: int, setup, recipe) -> dict:
        """Train, score and probe one model: a JSON-able record with ``method``, ``seed`` and ``seconds``."""
        raise NotImplementedError

    def describe(self, res: dict) -> str:
        """The scores of a finished run, for its line on the console."""
        raise NotImplementedError

    def summarize(self, out_dir: str) -> tuple[dict, str]:
        """``(results, table)`` of the finished runs (:attr:`runs`, each method's sorted by seed); draws the
        figures into ``out_dir``."""
        raise NotImplementedError

    def tasks(self) -> list[tuple[str, int]]:
        """``(method, seed)`` of every run to train."""
        return [(m, seed) for seed in self.seeds for m in self.methods]

    def saved(self, method: str, seed: int) -> dict | None:
        """A finished run from an earlier invocation (not trained again), or None."""
        return None

    def save(self, res: dict) -> None:
        """Keep a run that just finished (for :meth:`saved`)."""

    # ------------------------------------------------------------------ shared
    @classmethod
    def seed_list(cls, args) -> list[int]:
        """The seeds for ``causal-attn demo``'s ``--seeds`` / ``--first-seed`` (the part's defaults where not
        given; one seed with ``--quick``)."""
        first = cls.first_seed if args.first_seed is None else args.first_seed
        count = 1 if args.quick else (cls.default_seeds if args.seeds is None else args.seeds)
        return list(range(first, first + count))

    @property
    def setup(self):
        key = (type(self).__name__, self.setup_key())
        if key not in _SETUPS:
            _SETUPS[key] = self.make_setup()
        return _SETUPS[key]

    @property
    def seconds_per_run(self) -> float:
        return self.seconds_per_step * self.recipe.batch_size * self.recipe.steps

    def run(self, method: str, seed: int) -> dict:
        return self.one_run(method, seed, self.setup, self.recipe)

    def pending(self) -> list[tuple[str, int]]:
        """The runs to train; those :meth:`saved` has are reported at once."""
        todo = []
        for method, seed in self.tasks():
            done = self.saved(method, seed)
            if done is None:
                todo.append((method, seed))
            else:
                self.report(done, resumed=True)
        return todo

    def report(self, res: dict, resumed: bool = False) -> None:
        self.runs[res["method"]].append(res)
        if not resumed:
            self.save(res)
        width = max(len(m) for m in self.methods)
        print(f"  seed {res['seed']} {res['method']:{width}s}: {self.describe(res)}  ({res['seconds']:.0f} s"
              + (", resumed" if resumed else "") + ")", flush=True)

    def finish(self, out_dir: str) -> tuple[dict, str]:
        for rs in self.runs.values():
            rs.sort(key=lambda r: r["seed"])
        return self.summarize(out_dir)

    def __getstate__(self):
        return {**self.__dict__, "runs": {m: [] for m in self.methods}}

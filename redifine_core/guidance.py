"""CFG schedules: one small grammar for w(progress) over denoising steps and w(iteration) along the chain.

CONTRACT (filled in by issue 2):

    class Schedule:                         # immutable; parse once, evaluate many times
        spec: str                           # canonical text form (parse(s.spec) == s)
        def scale(self, progress: float, iteration: int = 0) -> float     # progress in [0, 1], 0 = first step
        def values(self, steps: int, iteration: int = 0) -> list[float]  # per-step scales, step i at progress i/(steps-1)
        def at_iteration(self, iteration: int) -> "Schedule"             # the per-step schedule used at chain iteration i
        is_chain_axis: bool

    def parse_schedule(spec: str | float | Schedule) -> Schedule       # raises ScheduleSyntaxError (a ValueError)
    class ScheduleSyntaxError(ValueError)
    PRESETS: dict[str, str]                 # "redifine" -> its expansion
"""

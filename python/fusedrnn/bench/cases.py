"""What to run: the benchmark matrix of DESIGN.md, the --quick subset, and one case's data.

A *config* is a named shape (T, B, I, H, L); a *case* is a config run for one cell, one mode
("infer" or "train") and one thread count. ``Problem`` holds the float32 arrays of one
(config, cell): weights in torch.nn's layout and gate order, the input, the initial states and
the upstream gradient used for training.
"""
import zlib
from dataclasses import dataclass

import numpy as np

from .. import reference

CELLS = ("rnn", "rnn_relu", "lstm", "gru")      # "rnn" is the tanh Elman RNN
DEFAULT_CELLS = ("rnn", "lstm", "gru")
KERNEL_CELL = {"rnn": "rnn_tanh", "rnn_relu": "rnn_relu", "lstm": "lstm", "gru": "gru"}
GATES = {"rnn": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
MODES = ("infer", "train")
DEFAULT_THREADS = (1, 2)


@dataclass(frozen=True)
class Config:
    name: str
    T: int
    B: int
    I: int
    H: int
    L: int
    why: str = ""
    D: int = 1   # directions: 2 for a bidirectional model (--bidirectional)

    @property
    def shape(self):
        return f"T={self.T} B={self.B} I={self.I} H={self.H} L={self.L}" + (
            " bidirectional" if self.D == 2 else "")

    @property
    def base_name(self):
        """The name of the config this one is the bidirectional form of (else its own)."""
        return self.name[:-len(BIDIRECTIONAL_SUFFIX)] if self.D == 2 else self.name


BIDIRECTIONAL_SUFFIX = "-bidir"


def bidirectional(config):
    """The config with both directions in every layer (torch.nn's bidirectional=True, ONNX's
    direction="bidirectional"), named apart: issue 6's targets are the one-way matrix's."""
    return Config(config.name + BIDIRECTIONAL_SUFFIX, config.T, config.B, config.I, config.H,
                  config.L, config.why, D=2)


# DESIGN.md, "Benchmark matrix".
MATRIX = (
    Config("fastrnns", 100, 64, 512, 512, 1, "PyTorch's own RNN benchmark default"),
    Config("online-small", 100, 1, 128, 128, 1, "streaming inference, overhead-bound"),
    Config("stacked", 50, 16, 256, 256, 2, "a typical 2-layer model"),
    Config("wide", 200, 32, 64, 1024, 1, "large hidden state, weight-bandwidth-bound"),
    Config("long-seq", 1000, 1, 32, 64, 1, "long time series, latency-bound"),
    Config("deepbench-train", 25, 64, 1024, 1024, 1, "DeepBench-style training step"),
)
CONFIGS = {c.name: c for c in MATRIX}

# --quick: one thread, and per config the cells and modes that show each regime once:
# overhead-bound (online-small), latency-bound (long-seq), a 2-layer model (stacked) and a
# GEMM-bound inference (fastrnns). It finishes in well under a minute with every peer.
QUICK = (
    ("online-small", ("rnn", "lstm", "gru"), ("infer", "train")),
    ("long-seq", ("lstm",), ("infer",)),
    ("stacked", ("lstm", "gru"), ("infer", "train")),
    ("fastrnns", ("lstm",), ("infer",)),
)
QUICK_THREADS = (1,)


@dataclass(frozen=True)
class Case:
    config: Config
    cell: str
    mode: str
    threads: int

    @property
    def label(self):
        return f"{self.config.name} {self.cell} {self.mode} t={self.threads}"

    @property
    def flops(self):
        return flops(self.config, self.cell, self.mode)


def custom_config(T, B, I, H, L):
    """A --sizes shape, named after its sizes."""
    return Config(f"T{T}-B{B}-I{I}-H{H}-L{L}", T, B, I, H, L, "user sizes")


def flops(config, cell, mode):
    """DESIGN.md: forward 2*T*B*G*H*(I+H) per layer and direction (input of layer k>0 is D*H);
    training 3x."""
    G = GATES[cell]
    c = config
    total = 0
    for k in range(c.L):
        I_k = c.I if k == 0 else c.D * c.H
        total += c.D * 2 * c.T * c.B * G * c.H * (I_k + c.H)
    return total * (3 if mode == "train" else 1)


def plan(configs, cells, modes, threads, quick_subset=False):
    """The cases to run, thread count outermost so each thread setting is made once.

    With ``quick_subset`` only the (config, cell, mode) triples of QUICK that pass the filters.
    """
    allowed = None
    if quick_subset:
        allowed = {(name, cell, mode) for name, qcells, qmodes in QUICK
                   for cell in qcells for mode in qmodes}
    cases = []
    for n in threads:
        for config in configs:
            for cell in cells:
                for mode in modes:
                    if allowed is not None and (config.base_name, cell, mode) not in allowed:
                        continue
                    cases.append(Case(config, cell, mode, n))
    return cases


@dataclass
class Problem:
    """Arrays of one (config, cell). layers[k] has w_ih, w_hh, b_ih, b_hh (torch order);
    reverse[k] the same of layer k's reverse direction (bidirectional configs; else None)."""
    cell: str
    layers: list
    x: np.ndarray            # (T, B, I)
    h0: np.ndarray           # (L*D, B, H), layer by layer, each layer's directions in order
    c0: object               # (L*D, B, H) for lstm, else None
    dy: np.ndarray           # (T, B, D*H): upstream gradient of y for training
    reverse: list = None

    @property
    def kernel_cell(self):
        return KERNEL_CELL[self.cell]

    @property
    def shape(self):
        T, B, I = self.x.shape
        return T, B, I, self.h0.shape[2], len(self.layers)

    @property
    def D(self):
        return 1 if self.reverse is None else 2

    def directions(self, k):
        """Layer k's weights per direction: [forward's] or [forward's, reverse's]."""
        return [self.layers[k]] + ([] if self.reverse is None else [self.reverse[k]])

    def _with(self, cast, x, h0, c0, dy):
        layers = [{k: cast(v) for k, v in w.items()} for w in self.layers]
        reverse = None if self.reverse is None else [{k: cast(v) for k, v in w.items()}
                                                     for w in self.reverse]
        return Problem(self.cell, layers, x, h0, c0, dy, reverse)

    def truncated(self, T, B):
        """The same weights on the first T steps and B batch rows."""
        return self._with(lambda a: a, self.x[:T, :B].copy(), self.h0[:, :B].copy(),
                          None if self.c0 is None else self.c0[:, :B].copy(),
                          self.dy[:T, :B].copy())

    def rows(self, rows):
        """The same weights on batch rows ``rows`` (a list), every step."""
        def pick(a):
            return None if a is None else a[:, rows].copy()
        return self._with(lambda a: a, pick(self.x), pick(self.h0), pick(self.c0), pick(self.dy))

    def astype(self, dtype):
        def cast(a):
            return None if a is None else a.astype(dtype)
        return self._with(cast, cast(self.x), cast(self.h0), cast(self.c0), cast(self.dy))


def make_problem(config, cell, seed=0):
    """Seeded float32 weights (torch's initialisation), input, states and upstream gradient."""
    rng = np.random.default_rng([seed, zlib.crc32(f"{config.name}/{cell}".encode())])
    c = config
    layers, reverse = [], []
    for k in range(c.L):
        for d in range(c.D):
            w = reference.init_weights(KERNEL_CELL[cell], c.I if k == 0 else c.D * c.H, c.H,
                                       dtype=np.float32, rng=rng)
            (reverse if d else layers).append(
                {name: w[name] for name in ("w_ih", "w_hh", "b_ih", "b_hh")})

    def normal(*shape, scale=1.0):
        # Drawn in float32: a huge --sizes case gets no float64 copy on the way.
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(scale)
        return a

    x = normal(c.T, c.B, c.I)
    h0 = normal(c.L * c.D, c.B, c.H, scale=0.5)
    c0 = normal(c.L * c.D, c.B, c.H, scale=0.5) if cell == "lstm" else None
    dy = normal(c.T, c.B, c.D * c.H)
    return Problem(cell, layers, x, h0, c0, dy, reverse if c.D == 2 else None)


def torch_names(problem):
    """{torch.nn parameter name: array} of the problem's weights (weight_ih_l0,
    bias_hh_l1_reverse, ...)."""
    state = {}
    for k in range(len(problem.layers)):
        for d, w in enumerate(problem.directions(k)):
            for ours, theirs in (("w_ih", "weight_ih"), ("w_hh", "weight_hh"),
                                 ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                state[f"{theirs}_l{k}{'_reverse' if d else ''}"] = w[ours]
    return state

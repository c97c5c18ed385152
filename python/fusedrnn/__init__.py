"""fusedrnn: fused SIMD C++ kernels for RNN, LSTM and GRU under a torch.nn-shaped NumPy API."""
from ._config import (__version__, empty_cache, get_num_threads, get_thread_policy,
                      set_num_threads, set_thread_policy, show_config)
from .layers import GRU, LSTM, RNN

__all__ = ["__version__", "show_config", "set_num_threads", "get_num_threads",
           "set_thread_policy", "get_thread_policy", "empty_cache", "RNN", "LSTM", "GRU"]

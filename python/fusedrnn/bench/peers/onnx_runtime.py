"""Peer: ONNX Runtime (CPU), inference only.

The model is built in memory with ``onnx.helper``: one RNN / LSTM / GRU node per layer (with a
Squeeze of the direction axis between layers, or for a bidirectional model a Transpose and a
Reshape of the two directions' outputs to torch's (T, B, 2H)), weights moved from torch's gate
order to ONNX's
(LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h), GRU with ``linear_before_reset=1`` as PyTorch.
The session runs ``intra_op_num_threads`` = the case's thread count, ``inter_op_num_threads`` = 1.
"""
import numpy as np

from ...onnx_layout import to_onnx_gates

OPSET = 17
IR_VERSION = 8
OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "rnn_relu": "RNN"}


class OnnxRuntimePeer:
    name = "onnxruntime"
    modes = ("infer",)

    def __init__(self):
        import onnx              # ImportError here means: skip this peer
        import onnxruntime
        self.onnx, self.ort = onnx, onnxruntime
        self.version = onnxruntime.__version__
        self.threads = 1

    def set_threads(self, n):
        self.threads = n

    def skip_reason(self, case):
        return None if case.mode == "infer" else "inference only"

    def prepare(self, problem, mode):
        model = build_model(self.onnx, problem)
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        session = self.ort.InferenceSession(model.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        return OnnxRunner(session, problem)


def build_model(onnx, problem):
    from onnx import TensorProto, helper, numpy_helper
    cell = problem.cell
    T, B, I, H, L = problem.shape
    D = problem.D
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, [T, B, I]),
              helper.make_tensor_value_info("h0", f32, [L * D, B, H])]
    if cell == "lstm":
        inputs.append(helper.make_tensor_value_info("c0", f32, [L * D, B, H]))
    init = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([T, B, D * H], np.int64), "y_shape")]
    nodes, hn_names, cn_names = [], [], []
    layer_in = "x"
    for k in range(L):
        ws = problem.directions(k)
        W = np.stack([to_onnx_gates(w["w_ih"], cell) for w in ws])
        R = np.stack([to_onnx_gates(w["w_hh"], cell) for w in ws])
        Bias = np.stack([np.concatenate([to_onnx_gates(w["b_ih"], cell),
                                         to_onnx_gates(w["b_hh"], cell)]) for w in ws])
        for name, arr in ((f"W{k}", W), (f"R{k}", R), (f"B{k}", Bias)):
            init.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        # initial state of layer k: h0[k*D:(k+1)*D] (and c0's)
        starts = numpy_helper.from_array(np.array([k * D], np.int64), f"s{k}")
        ends = numpy_helper.from_array(np.array([(k + 1) * D], np.int64), f"e{k}")
        init += [starts, ends]
        nodes.append(helper.make_node("Slice", ["h0", f"s{k}", f"e{k}"], [f"h0_{k}"]))
        node_in = [layer_in, f"W{k}", f"R{k}", f"B{k}", "", f"h0_{k}"]
        node_out = [f"Y{k}", f"hn{k}"]
        attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
        if cell == "lstm":
            nodes.append(helper.make_node("Slice", ["c0", f"s{k}", f"e{k}"], [f"c0_{k}"]))
            node_in.append(f"c0_{k}")
            node_out.append(f"cn{k}")
            cn_names.append(f"cn{k}")
        elif cell == "gru":
            attrs["linear_before_reset"] = 1
        elif cell == "rnn_relu":
            attrs["activations"] = ["Relu"] * D
        nodes.append(helper.make_node(OP[cell], node_in, node_out, name=f"layer{k}", **attrs))
        # Y is (T, D, B, H): drop the direction axis for the next layer, or put the two
        # directions side by side in each row, as torch's y (T, B, 2H).
        if D == 1:
            nodes.append(helper.make_node("Squeeze", [f"Y{k}", "axis1"], [f"y{k}"]))
        else:
            nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", [f"Yt{k}", "y_shape"], [f"y{k}"]))
        layer_in = f"y{k}"
        hn_names.append(f"hn{k}")
    nodes.append(helper.make_node("Identity", [layer_in], ["y"]))
    nodes.append(helper.make_node("Concat", hn_names, ["hn"], axis=0))
    outputs = [helper.make_tensor_value_info("y", f32, [T, B, D * H]),
               helper.make_tensor_value_info("hn", f32, [L * D, B, H])]
    if cell == "lstm":
        nodes.append(helper.make_node("Concat", cn_names, ["cn"], axis=0))
        outputs.append(helper.make_tensor_value_info("cn", f32, [L * D, B, H]))
    graph = helper.make_graph(nodes, f"fusedrnn_bench_{cell}", inputs, outputs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fusedrnn.bench")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


class OnnxRunner:
    def __init__(self, session, problem):
        self.session = session
        self.feeds = {"x": problem.x, "h0": problem.h0}
        if problem.c0 is not None:
            self.feeds["c0"] = problem.c0
        self.names = [o.name for o in session.get_outputs()]

    def __call__(self):
        return self.session.run(None, self.feeds)

    def outputs(self, result):
        return dict(zip(self.names, result))

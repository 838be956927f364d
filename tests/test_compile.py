"""Stochastic depth under torch.compile: graphs independent of the mask stream and of the rates.

Graphs are counted with Dynamo's ``CompileCounterWithBackend("aot_eager")`` (AOT autograd, so the
backward is compiled too, without inductor's code generation). "No recompile after warm-up" is
asserted with ``torch._dynamo.config.error_on_recompile``: any guard failure after the warm-up raises.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.data import DataLoader

from lightning_sd.callbacks import StochasticDepth
from lightning_sd.core.gates import inject_stochastic_depth
from lightning_sd.models.cifar_resnet import CifarResNet
from lightning_sd.models.residual_mlp import ResidualMLP
from tests.helpers import ClassifierModule, NestedResidualBlock, RegressionModule, image_loader, regression_data, trainer_kwargs

WARM_UP = 20


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _run_pair(model, compiled, ref, handle, ref_handle, x, steps, new_rates_at=None, caplog=None, first_step=0, warm_up=WARM_UP):
    """Same masks in both models; returns the graph counts after each step. Asserts equality at every step."""
    counts = []
    for step in range(first_step, first_step + steps):
        if new_rates_at is not None and step == new_rates_at:
            rates = torch.linspace(0.9, 0.35, handle.num_blocks)
            handle.set_survival(rates)
            ref_handle.set_survival(rates)
        handle.resample(step, batch_size=x.shape[0])
        ref_handle.resample(step, batch_size=x.shape[0])
        with torch._dynamo.config.patch(error_on_recompile=step >= warm_up):
            out = compiled(x)
        out.square().sum().backward()
        expected = ref(x)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        for got, want in zip(_grads(model), _grads(ref)):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if handle.drop == "batch":
            for gate, kept in zip(handle.gates, handle.kept.tolist()):
                if not kept and hasattr(gate, "branch_target"):  # a skipped branch: exact zero gradients (DDP sees every parameter)
                    assert all(float(w.grad.abs().max()) == 0.0 for w in gate._weights())
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        counts.append(compiled_graphs(compiled))
    if caplog is not None:
        assert not [r for r in caplog.records if "recompile_limit" in r.getMessage() or "cache_size_limit" in r.getMessage()]
    return counts


def compiled_graphs(compiled) -> int:
    return compiled.counter.frame_count


class _Compiled:
    """``torch.compile(model)`` with a graph counter attached."""

    def __init__(self, model: nn.Module, backend: str = "aot_eager", **compile_kwargs) -> None:
        self.counter = CompileCounterWithBackend(backend)
        self.fn = torch.compile(model, backend=self.counter, **compile_kwargs)

    def __call__(self, x):
        return self.fn(x)


def _pair(model: nn.Module, **inject):
    ref = copy.deepcopy(model)
    handle = inject_stochastic_depth(model, 0.5, auto_resample=False, seed=5, **inject)
    ref_handle = inject_stochastic_depth(ref, 0.5, auto_resample=False, seed=5, **inject)
    return handle, ref, ref_handle


def test_whole_model_batch_drop_without_buffers_is_one_graph_over_60_steps(caplog) -> None:
    """Route "cond": one graph for 60 random masks and a change of rates; outputs and gradients as eager."""
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 4, 2).train()
    handle, ref, ref_handle = _pair(model)
    compiled = _Compiled(model)
    masks = set()
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(6, 8), 60, new_rates_at=40, caplog=caplog)
    handle.resample(0)
    for step in range(60):
        masks.add(tuple(handle.resample(step).tolist()))
    assert len(masks) >= 10  # many distinct patterns
    assert counts[-1] == counts[WARM_UP - 1] == 1  # bound: one graph, whatever the masks and rates


def test_whole_model_batch_drop_with_batchnorm_is_one_graph_with_the_buffers_of_eager(caplog) -> None:
    """Route "cond" with BatchNorm in the branches: the statistics cross the cond; one graph, buffers as eager."""
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()  # 3 blocks with BatchNorm, 2 block types (identity / padded shortcut)
    handle, ref, ref_handle = _pair(model)
    assert handle.compile_route == "cond" and all(g.holds_state for g in handle.gates)
    compiled = _Compiled(model)
    before = int(model.layer1[0].bn1.num_batches_tracked)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(4, 3, 8, 8), 60, new_rates_at=40, caplog=caplog)
    assert counts[-1] == counts[WARM_UP - 1] == 1  # bound: one graph, whatever the masks and rates
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, want, rtol=1e-4, atol=1e-4, msg=name)
    # the first block ran on some steps only: its BatchNorm counted exactly those
    assert 0 < int(model.layer1[0].bn1.num_batches_tracked) - before < 60


def _branch_structure(graph_module: torch.fx.GraphModule) -> tuple:
    """A cond branch's graph up to the names and order of its inputs (Dynamo names and sorts them by a counter)."""
    position: dict[torch.fx.Node, int] = {}
    nodes = []
    for i, node in enumerate(graph_module.graph.nodes):
        position[node] = i
        if node.op == "placeholder":
            continue
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: "input" if a.op == "placeholder" else position[a])
        nodes.append((node.op, str(node.target), repr(args)))
    return tuple(nodes)


@pytest.mark.parametrize(
    ("model", "shape", "distinct"),
    [
        (lambda: ResidualMLP(8, 16, 4, 2), (6, 8), 1),  # 4 alike blocks
        # 6 blocks: stage 1's two alike; in stages 2 and 3 a downsampling block (padded shortcut) and a plain one
        (lambda: CifarResNet(14, width=4), (4, 3, 8, 8), 5),
    ],
)
def test_alike_blocks_trace_to_one_cond_branch(model, shape, distinct) -> None:
    """Alike blocks trace to the same ``torch.cond`` branch graph, whatever their index.

    The block's index (into the handle's multipliers) was a constant of each branch, so that Inductor
    generated and compiled one kernel set per block, not per block type: CifarResNet-56 at budget 0.5 compiled
    106 distinct C++ kernels (26 for the plain model), 58 once ``m_l`` entered the cond as an operand
    (``bench_compile.py``'s kernels column; docs/compile.md).
    """
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    net = model().train()
    handle = inject_stochastic_depth(net, 0.5, auto_resample=False, seed=5)
    handle.resample(0)
    torch.compile(net, backend=capture)(torch.randn(shape))
    branches = [m for name, m in graphs[0].named_children() if name.startswith("cond_true")]
    assert len(branches) == handle.num_blocks
    assert len({_branch_structure(b) for b in branches}) == distinct


@pytest.mark.parametrize("drop", ["batch", "sample", "subset"])
def test_whole_model_with_a_residual_inside_a_branch(caplog, drop) -> None:
    """A residual nested in another's branch (timm EdgeNeXt), BatchNorm in the inner branch: one graph over 40
    steps; outputs, gradients and buffers as eager. Batch drop: the inner gate's torch.cond runs inside the
    outer one's kept branch (crashed before: the inner gate looked its layer scale up with ``get_parameter``
    inside the outer ``functional_call``, and the two conds lifted aliased views of the multipliers). Subset
    drop: the inner rows are drawn at resample for the outer subset's size (17 graphs before, one per draw)."""
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = nn.Sequential(NestedResidualBlock(8, batchnorm=True), NestedResidualBlock(8, batchnorm=True)).train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="drop='subset'")  # BatchNorm on subsets: expected here
        handle, ref, ref_handle = _pair(model, drop=drop)
    assert [b.name for b in handle.branches] == ["0.branch0", "0.branch1", "1.branch0", "1.branch1"]
    assert handle.drop_kind.enclosing == [1, None, 3, None]
    compiled = _Compiled(model)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(6, 8), 40, caplog=caplog)
    assert counts[-1] == counts[WARM_UP - 1] == 1
    if drop == "batch":
        assert _conds(compiled.counter.graphs[0]) == 2  # the outer gates'; each holds its inner gate's cond
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, want, rtol=1e-4, atol=1e-4, msg=name)


def test_graph_break_route_with_batchnorm_gives_the_same_graph_count_for_any_depth(caplog) -> None:
    """Route "graph_break": the decision eager between compiled pieces; graphs per block type, not per block or mask."""
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = CifarResNet(14, width=4).train()
    handle, ref, ref_handle = _pair(model)
    handle.compile_route = "graph_break"
    compiled = _Compiled(model)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(4, 3, 8, 8), 30, caplog=caplog)
    # Bound: 12 graphs for this network (6 measured, the same for ResNet-20 and ResNet-56).
    assert counts[-1] == counts[WARM_UP - 1] <= 12
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, want, rtol=1e-4, atol=1e-4, msg=name)
    counts = []
    for depth in (14, 26):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = CifarResNet(depth, width=4).train()
        handle = inject_stochastic_depth(model, 0.5, auto_resample=False)
        handle.compile_route = "graph_break"
        compiled = _Compiled(model)
        x = torch.randn(2, 3, 8, 8)
        for step in range(4):
            handle.resample(step)
            compiled(x).sum().backward()
        counts.append(compiled_graphs(compiled))
    assert counts[0] == counts[1]


@pytest.mark.slow
def test_zoo_models_compile_whole_with_batch_drop_as_eager(caplog) -> None:
    """torchvision ResNet-18 (BatchNorm, downsample convolutions in 3 shortcuts) and timm ConvNeXt (depthwise
    weights (C, 1, 7, 7)) compiled whole with Inductor: one graph, every gate a ``torch.cond``, equal to eager
    for the same masks. Before the gates chose the layouts of what crosses the cond, both took the ``"graph_break"``
    route at those blocks (12 and 8 graphs, their branches eager) to avoid torch 2.14's failures."""
    import timm
    import torchvision

    caplog.set_level(logging.WARNING)
    for build in [lambda: torchvision.models.resnet18(num_classes=10), lambda: timm.create_model("convnext_atto", num_classes=10)]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build().train().double()  # float64: in float32 a ReLU's kink moves single gradients by percents
        handle, ref, ref_handle = _pair(model)
        compiled = _Compiled(model, backend="inductor")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="lightning_sd: in this compiled model")  # no branch runs eagerly
            x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
            counts = _run_pair(model, compiled, ref, handle, ref_handle, x, 4, caplog=caplog)
        assert counts == [1, 1, 1, 1]
        assert _conds(compiled.counter.graphs[0]) == handle.num_blocks
        for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(buf, want, rtol=1e-4, atol=1e-4, msg=name)


class _DownsampleResNet(nn.Module):
    """A stem and two torchvision ``BasicBlock``s, the second with a convolution in its shortcut (``downsample``)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        downsample = nn.Sequential(nn.Conv2d(16, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16, stride=2, downsample=downsample))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.slow
def test_inductor_cond_route_with_a_convolution_in_a_shortcut() -> None:
    """With Inductor's layout optimization (on by default, always taken for convolutions on CPU), a block
    whose input feeds both a convolution in its shortcut and a gate's cond failed at the first forward
    (``assert_size_stride``: the cond's subgraph was compiled for the input's traced layout, the main graph
    passed it channels_last; torch 2.14). The activations of a branch with convolutions now cross the cond in
    channels_last, the layout Inductor gives them (the parameters flattened): one graph,
    both gates conds, outputs and gradients as eager."""
    torch.manual_seed(0)
    model = _DownsampleResNet().train()
    handle, ref, ref_handle = _pair(model)
    assert [b.shortcut for b in handle.branches] == ["identity", "projection"] and handle.compile_route == "cond"
    compiled = _Compiled(model, backend="inductor")
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(2, 3, 16, 16), 4, warm_up=2)
    assert counts == [1, 1, 1, 1]
    assert _conds(compiled.counter.graphs[0]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("route", ["graph_break", "regional", "channels_last", "no_layout_optimization"])
def test_inductor_other_routes_with_a_convolution_in_a_shortcut(route) -> None:
    """The other ways to compile the network above, as docs/compile.md lists them, with Inductor: outputs and gradients as eager."""
    torch.manual_seed(0)
    model = _DownsampleResNet().train()
    x = torch.randn(2, 3, 16, 16)
    if route == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    handle, ref, ref_handle = _pair(model)
    if route == "regional":
        compiled = _Regions(model, handle)
    else:
        handle.compile_route = "graph_break" if route == "graph_break" else "cond"
        compiled = _Compiled(model, backend="inductor")
    layout_optimization = route != "no_layout_optimization"
    with torch._inductor.config.patch(layout_optimization=layout_optimization):  # read when Inductor compiles
        counts = _run_pair(model, compiled, ref, handle, ref_handle, x, 4, warm_up=2)
    assert counts[-1] == counts[1] >= 1


class _MobileNet(nn.Module):
    """A stem (convolution, BatchNorm) and two timm ``InvertedResidual`` blocks (1 x 1 and depthwise convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models._efficientnet_blocks import InvertedResidual

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(InvertedResidual(8, 8, exp_ratio=2.0), InvertedResidual(8, 8, exp_ratio=2.0))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.slow
def test_inductor_cond_route_with_depthwise_and_pointwise_convolutions() -> None:
    """MobileNet/EfficientNet blocks under Inductor. Their weights have dimensions of size 1 (depthwise
    (C, 1, 3, 3), pointwise (C', C, 1, 1)), whose gradients ``torch.cond`` rejected when their strides
    differed on those dimensions between its two branches ("The sorted order of strides ... doesn't
    match"), and the input of the first block is a BatchNorm output that Inductor laid out channels_last
    while the cond's subgraph expected its traced layout (``assert_size_stride``; timm EfficientNet-B0):
    those gates took the ``"graph_break"`` route, their branches eager. The parameters now cross the cond
    flattened and the activations in channels_last: one graph, two conds, outputs and gradients as eager."""
    torch.manual_seed(0)
    model = _MobileNet().train()
    handle, ref, ref_handle = _pair(model)
    assert handle.num_blocks == 2 and any(w.ndim == 4 and w.shape[1] == 1 for w in handle.gates[0]._weights())
    compiled = _Compiled(model, backend="inductor")
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(2, 3, 16, 16), 4, warm_up=2)
    assert counts == [1, 1, 1, 1]
    assert _conds(compiled.counter.graphs[0]) == 2
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("source", "name", "before_convolution"),
    [
        ("timm", "poolformer_s12", [True] * 24),  # convolutions in every MLP branch and between stages
        ("torchvision", "swin_t", [False] * 24),  # the patch embedding is the only convolution, before the blocks
        ("timm", "vit_tiny_patch16_224", [False] * 24),
        ("torchvision", "resnet18", [True] * 8),
    ],
)
def test_gates_know_whether_a_convolution_follows_their_block(source: str, name: str, before_convolution: list[bool]) -> None:
    """Which gates' 4-D activations cross ``torch.cond`` in channels_last: those of blocks registered before a
    convolution of the model (in their branch or after them), the tensors Inductor lays out channels_last."""
    import timm
    import torchvision

    with torch.device("meta"):
        model = timm.create_model(name) if source == "timm" else getattr(torchvision.models, name)()
    handle = inject_stochastic_depth(model, 0.5)
    assert [gate.precedes_convolution for gate in handle.gates] == before_convolution


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_inductor_cond_route_with_branches_without_convolutions_before_a_convolution(version: str) -> None:
    """PoolFormer (timm MetaFormer with pooling token mixers, GroupNorm): a block's token-mixing branch has
    no convolution, but its 4-D activations feed the convolutions of the later MLP branches and
    downsampling layers, which Inductor's layout optimization reads as a reason to lay them out
    channels_last: the cond's subgraph expected the traced layout (``assert_size_stride``), and once they
    crossed in channels_last, the kept branch's input gradient came out contiguous where the dropped
    branch's had the output gradient's layout ("The sorted order of strides of the two branches' output
    doesn't match"; timm poolformer_s12 and poolformerv2_s12 crashed, the first and the second way). Now:
    one graph, one cond per gate, outputs and gradients as eager."""
    from timm.models.metaformer import GroupNorm1, GroupNorm1NoBias, MetaFormer

    configs = {  # timm's poolformer_s12 and poolformerv2_s12, two stages of one block each
        "v1": dict(downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None),
        "v2": dict(norm_layers=GroupNorm1NoBias, res_scale_init_values=(1.0, 1.0)),
    }
    torch.manual_seed(0)
    model = MetaFormer(num_classes=10, depths=(1, 1), dims=(8, 16), use_mlp_head=False, **configs[version]).double().train()
    handle, ref, ref_handle = _pair(model)
    assert handle.num_blocks == 4 and all(gate.precedes_convolution for gate in handle.gates)
    compiled = _Compiled(model, backend="inductor")
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(4, 3, 16, 16, dtype=torch.float64), 4, warm_up=2)
    assert counts == [1, 1, 1, 1]
    assert _conds(compiled.counter.graphs[0]) == 4


class _Regions:
    """A model run eagerly, its branches compiled as regions by ``handle.compile`` (Inductor), with a graph counter."""

    def __init__(self, model: nn.Module, handle) -> None:
        self.counter = CompileCounterWithBackend("inductor")
        handle.compile(backend=self.counter)
        self.model = model

    def __call__(self, x):
        return self.model(x)


@pytest.mark.slow
def test_inductor_cond_route_when_the_next_block_reads_the_output_transposed() -> None:
    """MLP-Mixer's token mixing reads each gate's output transposed, so Inductor computed the gradient of
    the cond's output transposed while the cond's backward subgraphs were compiled for the traced layout:
    the first backward failed (``assert_size_stride`` in the dropped branch's backward, torch 2.14; also
    timm mixer_s16_224 and torchvision swin_t). The gradient now reaches the cond through a copy of fixed
    layout: outputs and gradients as eager, one graph."""
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(num_classes=10, img_size=32, patch_size=8, embed_dim=32, num_blocks=2).train()
    handle, ref, ref_handle = _pair(model)
    assert handle.num_blocks == 4
    compiled = _Compiled(model, backend="inductor")
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(2, 3, 32, 32), 4, warm_up=2)
    assert counts == [1, 1, 1, 1]
    assert _conds(compiled.counter.graphs[0]) == 4


@pytest.mark.slow
def test_inductor_graph_break_route_across_stage_shapes() -> None:
    """ConvNeXt with its gates on the ``"graph_break"`` route: the code after a break is compiled as frames
    that recur at every stage. At the second stage's shapes Dynamo recompiled them
    with symbolic sizes, which Inductor failed on ("cannot determine truth value of Relational", as it
    does for the plain ConvNeXt under ``dynamic=True``). Sizes other than the batch now stay static:
    outputs and gradients as eager, no new graph after the first step."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=10, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1)).train()
    handle, ref, ref_handle = _pair(model)
    handle.compile_route = ref_handle.compile_route = "graph_break"
    compiled = _Compiled(model, backend="inductor")
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(2, 3, 64, 64), 3, warm_up=1)
    assert counts[0] == counts[-1] <= 12


@pytest.mark.parametrize("untested", [True, False])
def test_compiled_skipping_on_an_untested_torch_warns_once_at_the_next_resample(monkeypatch, untested) -> None:
    """On a torch older than ``TESTED_TORCH`` (torch 2.11 gave ConvNeXt zero gradients under Inductor), the
    first trace of a skipping gate sets a flag and the next (eager) resample warns, once; the tested torch,
    and a traced forward at full depth (no cond), stay silent."""
    from lightning_sd.core import compilation

    monkeypatch.setattr(compilation, "UNTESTED_TORCH", untested)
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 4, 2).train()
    handle = inject_stochastic_depth(model, 1.0, auto_resample=False, seed=5)
    compiled = _Compiled(model)
    x = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle.resample(0, batch_size=4)
        compiled(x).sum().backward()  # every rate 1: traced without torch.cond
        handle.resample(1, batch_size=4)
        assert not [w for w in caught if "tested on torch" in str(w.message)]
        handle.set_survival([0.5] * handle.num_blocks)
        for step in range(2, 6):
            handle.resample(step, batch_size=4)
            compiled(x).sum().backward()
    messages = [str(w.message) for w in caught if "tested on torch" in str(w.message)]
    assert len(messages) == (1 if untested else 0)
    if untested:
        assert f">= {compilation.TESTED_TORCH[0]}.{compilation.TESTED_TORCH[1]}" in messages[0] and "drop='subset'" in messages[0]
        assert [w.filename for w in caught if "tested on torch" in str(w.message)] == [__file__]  # points at the caller


@pytest.mark.parametrize("drop", ["sample", "subset"])
def test_compiled_gates_on_a_torch_older_than_any_tested_for_compile_warn_once(monkeypatch, drop) -> None:
    """Below ``OLDEST_COMPILE_TORCH`` (torch 2.4.1 recompiled sample and subset drop at every step) every traced
    gate, of any drop kind, sets the flag, and the next resample says so once, naming both tested versions."""
    from lightning_sd.core import compilation

    monkeypatch.setattr(compilation, "OLD_COMPILE_TORCH", True)
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 4, 2).train()
    handle = inject_stochastic_depth(model, 0.5, drop=drop, auto_resample=False, seed=5)
    compiled = _Compiled(model)
    x = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle.resample(0, batch_size=4)
        assert not [w for w in caught if "tested on torch" in str(w.message)]  # nothing traced yet
        for step in range(1, 5):
            compiled(x).sum().backward()
            handle.resample(step, batch_size=4)
    messages = [str(w.message) for w in caught if "tested on torch" in str(w.message)]
    assert len(messages) == 1
    oldest, tested = compilation.OLDEST_COMPILE_TORCH, compilation.TESTED_TORCH
    assert f"tested on torch >= {oldest[0]}.{oldest[1]} only (drop='batch': >= {tested[0]}.{tested[1]})" in messages[0]


def test_compile_route_is_cond_by_default_and_can_be_set() -> None:
    mlp = inject_stochastic_depth(ResidualMLP(4, 8, 2, 1), 0.5)
    resnet = inject_stochastic_depth(CifarResNet(8, width=4), 0.5)
    assert [g.holds_state for g in mlp.gates] == [False, False]
    assert all(g.holds_state for g in resnet.gates)
    assert mlp.compile_route == resnet.compile_route == "cond"
    with pytest.raises(ValueError, match="compile_route"):
        mlp.compile_route = "auto"
    mlp.compile_route = "graph_break"
    assert mlp.compile_route == "graph_break"
    names, buffers = resnet.gates[0].branch_buffers()
    block = resnet.model.layer1[0]
    assert names == [f"block.{m}.{b}" for m in ("bn1", "bn2") for b in ("running_mean", "running_var", "num_batches_tracked")]
    assert buffers[0] is block.bn1.running_mean and buffers[-1] is block.bn2.num_batches_tracked
    params = resnet.gates[0].branch_parameters()  # what the cond's branch runs on (views of them)
    assert list(params) == [f"block.{m}.{w}" for m, w in [("conv1", "weight"), ("bn1", "weight"), ("bn1", "bias"), ("conv2", "weight"), ("bn2", "weight"), ("bn2", "bias")]]
    assert params["block.conv2.weight"] is block.conv2.weight and len(params) == len(resnet.gates[0]._weights())


def test_masking_without_skipping_and_expected_evaluation_compile_once() -> None:
    """FSDP-style masking (skip_compute=False) and evaluation with p_l (scaling="expected"): rates are data."""
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 4, 2)
    handle, ref, ref_handle = _pair(model, scaling="expected")
    handle.skip_compute = ref_handle.skip_compute = False
    compiled = _Compiled(model)
    x = torch.randn(5, 8)
    for step in range(6):
        handle.resample(step)
        ref_handle.resample(step)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
    train_graphs = compiled_graphs(compiled)
    model.eval()
    ref.eval()
    for k in range(4):
        rates = torch.full((4,), 0.2 + 0.2 * k)
        handle.set_survival(rates)
        ref_handle.set_survival(rates)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
    assert train_graphs == 1
    assert compiled_graphs(compiled) == 2  # one more for evaluation mode, none per rate


@pytest.mark.parametrize("scaling", ["expected", "inverted"])
def test_pruned_blocks_stay_pruned_in_a_compiled_model(scaling) -> None:
    """handle.prune under a whole-model compile: the pruned blocks return their shortcut, as in eager."""
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 6, 2)
    handle, ref, ref_handle = _pair(model, scaling=scaling)
    for h in (handle, ref_handle):
        h.set_survival(torch.linspace(0.9, 0.4, 6))
    compiled = _Compiled(model)
    model.eval()
    ref.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        full = compiled(x)
        torch.testing.assert_close(full, ref(x), rtol=1e-4, atol=1e-4)
        kept = handle.prune(0.5, by="survival")
        ref_handle.prune(0.5, by="survival")
        assert kept == [0, 1, 2] and handle.pruned == [3, 4, 5]
        pruned = compiled(x)
        torch.testing.assert_close(pruned, ref(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(pruned, full)
        handle.unprune()
        ref_handle.unprune()
        torch.testing.assert_close(compiled(x), full, rtol=0, atol=0)


def test_regional_compilation_shares_one_graph_per_block_type(caplog) -> None:
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = CifarResNet(14, width=4).train()
    handle, ref, ref_handle = _pair(model)
    counter = CompileCounterWithBackend("aot_eager")
    types = handle.compile(backend=counter)
    assert types == 1  # the six branches have the same code: conv-bn-relu-conv-bn

    class Direct:
        def __init__(self):
            self.counter = counter

        def __call__(self, x):
            return model(x)

    counts = _run_pair(model, Direct(), ref, handle, ref_handle, torch.randn(4, 3, 8, 8), 30, new_rates_at=25, caplog=caplog)
    # One region per block type and parameter shape (parameters are static): here at most 2 per stage
    # (its first block sees the previous stage's input shape), 6 in all, for any depth and any masks.
    assert counts[-1] == counts[WARM_UP - 1] <= 6
    copied = copy.deepcopy(model)  # copies run the plain branches
    assert all("_compiled" not in g.__dict__ for g in copied.modules() if hasattr(g, "branch_target"))


def test_whole_model_and_regional_compilation_together() -> None:
    """Route "graph_break" with compiled regions: the pieces between gates and the branches are both compiled."""
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()
    handle, ref, ref_handle = _pair(model)
    handle.compile_route = "graph_break"
    regions = CompileCounterWithBackend("aot_eager")
    handle.compile(backend=regions)
    compiled = _Compiled(model)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(4, 3, 8, 8), 24)
    assert counts[-1] == counts[WARM_UP - 1] >= 1
    assert 1 <= regions.frame_count <= 6


def _conds(graph: torch.fx.GraphModule) -> int:
    return sum(node.target is torch.ops.higher_order.cond for node in graph.graph.nodes)


def _has_cond(graph: torch.fx.GraphModule) -> bool:
    return _conds(graph) > 0


def test_rates_at_one_compile_without_cond_and_one_variant_with_it() -> None:
    """Every rate 1 (budget 1, the start of a warm-up): the branches are added without torch.cond, as eager.

    Rates 1 -> below 1 -> 1 -> other rates below 1: two graphs (one without cond, one with), the second
    compiled once at the first change; no graph after it, and outputs, gradients, buffers equal to eager.
    """
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()  # BatchNorm: without the cond its statistics update in the main graph
    handle, ref, ref_handle = _pair(model)
    phases = [torch.ones(3), torch.tensor([0.9, 0.6, 0.3]), torch.ones(3), torch.tensor([0.8, 0.5, 0.2])]
    for h in (handle, ref_handle):
        h.set_survival(phases[0])
    compiled = _Compiled(model)
    x = torch.randn(4, 3, 8, 8)
    counts, step = [], 0
    for phase, rates in enumerate(phases):
        if phase:
            handle.set_survival(rates)
            ref_handle.set_survival(rates)
        # from phase 2 on, any recompile raises
        counts.append(_run_pair(model, compiled, ref, handle, ref_handle, x, 3, first_step=step, warm_up=6)[-1])
        step += 3
    assert counts == [1, 2, 2, 2]
    assert [_has_cond(g) for g in compiled.counter.graphs] == [False, True]
    for (name, buf), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, want, rtol=1e-4, atol=1e-4, msg=name)
    assert int(model.layer1[0].bn1.num_batches_tracked) == int(ref.layer1[0].bn1.num_batches_tracked) >= 6


def test_without_full_depth_specialization_rates_from_one_stay_one_graph() -> None:
    """handle.specialize_full_depth = False (rates that start at 1 and fall): the cond graph from the first step, no other."""
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 4, 2).train()
    handle, ref, ref_handle = _pair(model)
    handle.specialize_full_depth = False
    for h in (handle, ref_handle):
        h.set_survival(torch.ones(4))
    compiled = _Compiled(model)
    x = torch.randn(6, 8)
    assert _run_pair(model, compiled, ref, handle, ref_handle, x, 2) == [1, 1]
    for h in (handle, ref_handle):
        h.set_survival(torch.tensor([0.9, 0.7, 0.5, 0.3]))
    assert _run_pair(model, compiled, ref, handle, ref_handle, x, 4, first_step=2, warm_up=2) == [1] * 4
    assert [_has_cond(g) for g in compiled.counter.graphs] == [True]
    handle.specialize_full_depth = True  # the switch takes effect at once, without new rates
    handle.set_survival(torch.ones(4))
    ref_handle.set_survival(torch.ones(4))
    _run_pair(model, compiled, ref, handle, ref_handle, x, 1, first_step=6)
    assert [_has_cond(g) for g in compiled.counter.graphs] == [True, False]


def test_subset_drop_compiles_to_one_graph_over_30_steps(caplog) -> None:
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = ResidualMLP(8, 16, 4, 2).train()
    handle, ref, ref_handle = _pair(model, drop="subset")
    compiled = _Compiled(model)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(10, 8), 30, caplog=caplog)
    assert counts[-1] == 1
    assert handle.realized_depth() == pytest.approx(4 * 5 / 10)


@pytest.mark.parametrize("drop", ["batch", "sample", "subset"])
def test_fullgraph_compile_of_a_batchnorm_resnet(drop) -> None:
    """``torch.compile(model, fullgraph=True)`` (which raises at any graph break) works with every drop kind."""
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()
    handle, ref, ref_handle = _pair(model, drop=drop)
    compiled = _Compiled(model, fullgraph=True)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(4, 3, 8, 8), 6, warm_up=2)
    assert counts[-1] == 1
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, ref.get_buffer(name), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("drop", ["batch", "sample", "subset"])
def test_compiled_under_bf16_autocast_equals_eager(drop) -> None:
    """bf16 autocast (what ``precision="bf16-mixed"`` runs): the compiled model's outputs and gradients are
    eager's, for every drop kind (the cond's two branches return the shortcut's dtype)."""
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()
    handle, ref, ref_handle = _pair(model, drop=drop)
    compiled = _Compiled(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for step in range(4):
        handle.resample(step, batch_size=4)
        ref_handle.resample(step, batch_size=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, expected = compiled(x), ref(x)
        assert out.dtype == expected.dtype == torch.bfloat16
        out.float().square().sum().backward()
        expected.float().square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
        for got, want in zip(_grads(model), _grads(ref)):
            # drop="batch": the compiled branches convolve channels_last activations (the layout that crosses
            # torch.cond), another oneDNN kernel whose bf16 rounding differs; a wrong mask moves gradients by
            # their own size
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-2, atol=(3e-2 if drop == "batch" else 1e-2) * max(scale, 1.0))
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert compiled.counter.frame_count == 1


def test_fullgraph_compile_names_the_gate_at_a_graph_break() -> None:
    """Route "graph_break" is a graph break: ``fullgraph=True`` raises, and Dynamo's message says why and what to do."""
    if "reason" not in inspect.signature(torch.compiler.disable).parameters:
        pytest.skip("torch.compiler.disable takes a reason from torch 2.7")
    model = CifarResNet(8, width=4).train()
    handle = inject_stochastic_depth(model, 0.5, auto_resample=False, seed=5)
    handle.compile_route = "graph_break"
    handle.resample(0)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="lightning_sd: this batch-drop gate decides outside the compiled graph"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("drop", ["batch", "sample", "subset"])
def test_auto_resample_in_a_compiled_model_is_one_graph_with_the_masks_of_eager(drop) -> None:
    """``inject_stochastic_depth``'s default ``auto_resample=True`` under ``torch.compile``: the draw is one graph
    break before the model's graph (not one per step of the numpy draw), the masks are eager's, no recompile."""
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()
    ref = copy.deepcopy(model)
    handle = inject_stochastic_depth(model, 0.5, drop=drop, seed=5)
    ref_handle = inject_stochastic_depth(ref, 0.5, drop=drop, seed=5)
    compiled = _Compiled(model)
    x = torch.randn(6, 3, 8, 8)
    kept = set()
    for step in range(8):
        with torch._dynamo.config.patch(error_on_recompile=step >= 2):
            out = compiled(x)
        expected = ref(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        out.square().sum().backward()
        expected.square().sum().backward()
        for got, want in zip(_grads(model), _grads(ref)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if drop == "batch":
            kept.add(tuple(handle.drop_kind.kept_mask().tolist()))
            assert handle.drop_kind.kept_mask().tolist() == ref_handle.drop_kind.kept_mask().tolist()
    assert handle._auto_step == ref_handle._auto_step == 8
    assert compiled.counter.frame_count == 1
    if drop == "batch":
        assert len(kept) > 2  # the masks changed from step to step, without a new graph


def test_auto_resample_with_fullgraph_raises_with_what_to_do() -> None:
    if "reason" not in inspect.signature(torch.compiler.disable).parameters:
        pytest.skip("torch.compiler.disable takes a reason from torch 2.7")
    model = ResidualMLP(8, 16, 4, 2).train()
    inject_stochastic_depth(model, 0.5, seed=5)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"auto_resample=False\) \(or handle.auto_resample = False\)"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(2, 8))


def _follow_eager_over_batch_sizes(model, forward, ref, handle, ref_handle, counter, warm_up: int) -> list[int]:
    """Batch sizes 4, 3, 4, 2, 5, 3 with the same masks: outputs, gradients and buffers as eager; graphs after each step."""
    graphs = []
    for step, batch in enumerate([4, 3, 4, 2, 5, 3]):
        handle.resample(step, batch_size=batch)
        ref_handle.resample(step, batch_size=batch)
        x = torch.randn(batch, 3, 8, 8)
        with torch._dynamo.config.patch(error_on_recompile=step >= warm_up):
            out = forward(x)
        expected = ref(x)
        graphs.append(counter.frame_count)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        out.square().sum().backward()
        expected.square().sum().backward()
        for got, want in zip(_grads(model), _grads(ref)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, ref.get_buffer(name), rtol=1e-4, atol=1e-4, msg=name)
    return graphs


@pytest.mark.parametrize("specialize_float", [False, True])
def test_dynamic_true_with_batchnorm_follows_eager_over_changing_batch_sizes(specialize_float) -> None:
    """``torch.compile(model, dynamic=True)`` traces float attributes (BatchNorm's momentum and eps) as tensors,
    which ``torch.cond`` refuses: the gates then decide between compiled graphs (route "graph_break"); with
    ``specialize_float=True`` they keep their cond, one graph for every batch size."""
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()
    handle, ref, ref_handle = _pair(model)
    with torch._dynamo.config.patch(specialize_float=specialize_float):
        compiled = _Compiled(model, dynamic=True)
        graphs = _follow_eager_over_batch_sizes(model, compiled, ref, handle, ref_handle, compiled.counter, warm_up=2)
    # graph_break: the frames between the 3 gates' breaks (fixed by the block types), none per batch size
    assert graphs[-1] == (1 if specialize_float else 8)


def test_regional_compilation_with_dynamic_true_follows_eager_over_changing_batch_sizes() -> None:
    """``handle.compile(dynamic=True)`` (``StochasticDepth(compile={"dynamic": True})``): the branches compiled with
    symbolic sizes, no ``torch.cond``; one compiled branch function, and eager's outputs, gradients and buffers."""
    torch.manual_seed(0)
    model = CifarResNet(8, width=4).train()
    handle, ref, ref_handle = _pair(model)
    counter = CompileCounterWithBackend("aot_eager")
    assert handle.compile(backend=counter, dynamic=True) == 1
    graphs = _follow_eager_over_batch_sizes(model, model, ref, handle, ref_handle, counter, warm_up=2)
    assert graphs[-1] == graphs[1] >= 1  # no graph per batch size


def test_a_compiled_model_says_once_when_a_branch_runs_eagerly() -> None:
    """Gates on the "graph_break" route run their branches eagerly unless ``handle.compile()`` made regions:
    one warning per model, naming the first such block and why; none with regions, none on the cond route."""
    x = torch.randn(2, 3, 8, 8)
    resnet = CifarResNet(8, width=4).train()
    handle = inject_stochastic_depth(resnet, 0.5, auto_resample=False, seed=3)
    handle.compile_route = "graph_break"
    compiled = torch.compile(resnet, backend="aot_eager")
    with pytest.warns(UserWarning, match=r"gate of 'layer1.0' decides outside the compiled graph because its handle's compile_route") as record:
        for step in range(3):
            handle.resample(step)
            compiled(x).sum().backward()
    assert sum("decides outside the compiled graph" in str(w.message) for w in record) == 1

    torch._dynamo.reset()
    regional = CifarResNet(8, width=4).train()
    handle = inject_stochastic_depth(regional, 0.5, auto_resample=False, seed=3)
    handle.compile_route = "graph_break"
    handle.compile(backend="aot_eager")  # the same gates decide outside the graph, their branches compiled
    cond = CifarResNet(8, width=4).train()  # route "cond": decides inside the graph
    cond_handle = inject_stochastic_depth(cond, 0.5, auto_resample=False, seed=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lightning_sd: in this compiled model")
        for step in range(3):
            handle.resample(step)
            cond_handle.resample(step)
            torch.compile(regional, backend="aot_eager")(x).sum().backward()
            torch.compile(cond, backend="aot_eager")(x).sum().backward()


# ---------------------------------------------------------------- in a Trainer


class _GraphsAtEpochEnd(pl.Callback):
    def __init__(self, counter):
        self.counter = counter
        self.graphs: list[int] = []
        self.rates: list[list[float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.graphs.append(self.counter.frame_count)
        sd = next(c for c in trainer.callbacks if isinstance(c, StochasticDepth))
        self.rates.append(sd.survival.tolist())


def _fit(tmp_path, module, sd, extra=(), epochs=3):
    data = DataLoader(regression_data(n=48, in_features=8), batch_size=8)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[sd, *extra], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, data)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _sensemode(**kwargs) -> StochasticDepth:
    return StochasticDepth(mode="sensemode", budget=0.5, seed=3, sensitivity_batches=2, recompute_every_n_epochs=1, **kwargs)


@pytest.mark.parametrize("route", ["callback", "user"])
def test_trainer_with_sensemode_recomputation_does_not_recompile(tmp_path, route) -> None:
    """``StochasticDepth(compile=...)`` and a user-compiled LightningModule: same weights as eager, no new graph."""
    torch.manual_seed(0)
    eager = _fit(tmp_path / "eager", RegressionModule(in_features=8, width=16, depth=4, lr=0.01), _sensemode())
    counter = CompileCounterWithBackend("aot_eager")
    watch = _GraphsAtEpochEnd(counter)
    torch.manual_seed(0)
    module = RegressionModule(in_features=8, width=16, depth=4, lr=0.01)
    if route == "callback":
        sd = _sensemode(compile={"backend": counter})
        got = _fit(tmp_path / "compiled", module, sd, [watch])
        assert sd.effective_settings()["compile"] == {"backend": counter}
        assert "branches compiled as regions" in sd._settings_line()
    else:
        sd = _sensemode()
        module.net = torch.compile(module.net, backend=counter)  # the user compiles the network
        got = _fit(tmp_path / "compiled", module, sd, [watch])
        got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert watch.rates[0] != watch.rates[1] != watch.rates[2]  # re-measured every epoch
    assert watch.graphs[0] == watch.graphs[1] == watch.graphs[2] >= 1  # no graph after the first epoch
    for k, v in eager.items():
        assert bool(v.isfinite().all())
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize(("schedule", "budget", "cond"), [("pld", 0.5, True), ("constant", 1.0, False)])
def test_trainer_schedule_from_budget_one_compiles_one_variant(tmp_path, schedule, budget, cond) -> None:
    """A budget schedule starting at 1 (pld): the cond graph from the first step, none added when the rates fall.

    At a constant budget 1 the rates never fall: the graphs have no cond (as fast as the plain model).
    """
    counter = CompileCounterWithBackend("aot_eager")
    watch = _GraphsAtEpochEnd(counter)
    torch.manual_seed(0)
    module = RegressionModule(in_features=8, width=16, depth=4, lr=0.01)
    module.net = torch.compile(module.net, backend=counter)
    sd = StochasticDepth(mode="uniform", budget=budget, seed=3, schedule=schedule, pld_gamma=0.2)
    _fit(tmp_path, module, sd, [watch])
    assert watch.graphs[0] == watch.graphs[1] == watch.graphs[2] >= 1
    assert all(_has_cond(g) == cond for g in counter.graphs)
    means = [sum(r) / len(r) for r in watch.rates]
    if cond:
        assert 1.0 > means[0] > means[1] > means[2] > budget  # the rates fell at every step
    else:
        assert means == [1.0, 1.0, 1.0]


def test_compiled_around_gates_sees_a_compiled_module_that_holds_blocks_only() -> None:
    from lightning_sd.core.compilation import compiled_around_gates

    def wrapped(head_compiled: bool) -> tuple[nn.Module, object]:
        net = ResidualMLP(8, 8, 4, 1)
        handle = inject_stochastic_depth(net, 0.5, auto_resample=False)
        head = nn.Linear(1, 1)
        return nn.ModuleDict({"net": net, "head": torch.compile(head) if head_compiled else head}), handle

    outer, handle = wrapped(head_compiled=True)
    assert not compiled_around_gates(outer, handle)  # a compiled module without blocks: the gates run eagerly
    outer.net = torch.compile(outer.net)
    assert compiled_around_gates(outer, handle)
    outer, handle = wrapped(head_compiled=False)
    outer.net.blocks[2].compile()  # one block compiled in place: Dynamo traces its gate
    assert compiled_around_gates(outer, handle)
    outer, handle = wrapped(head_compiled=False)
    assert not compiled_around_gates(outer, handle)
    outer.compile()
    assert compiled_around_gates(outer, handle)


_RECOMPUTES = "the model is compiled whole, so each batch-drop gate runs its branch in torch.cond"
_REGIONS_UNUSED = "compile= changes nothing here"


@pytest.mark.parametrize("how", ["submodule", "in_place", "lightning", "with_compile_argument", "uncompiled", "regional"])
def test_trainer_says_what_a_model_compiled_whole_does_with_the_gates(tmp_path, caplog, how) -> None:
    """At train start: torch.cond's recomputation for a model compiled whole (``4/3 x budget``), and a warning
    when ``compile=`` regions would be inlined into it (redundant); nothing for an uncompiled model."""
    torch.manual_seed(0)
    module = RegressionModule(in_features=8, width=16, depth=4, lr=0.01)
    sd = StochasticDepth(mode="uniform", budget=0.75, seed=3, compile={"backend": "eager"} if how in ("with_compile_argument", "regional") else False)
    fitted: nn.Module = module
    if how in ("submodule", "with_compile_argument"):
        module.net = torch.compile(module.net, backend="eager")
    elif how == "in_place":
        module.net.compile(backend="eager")
    elif how == "lightning":
        fitted = torch.compile(module, backend="eager")  # Trainer.fit unwraps it (LightningModule._compiler_ctx)
    data = DataLoader(regression_data(n=16, in_features=8), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[sd], **trainer_kwargs(tmp_path, logger=False))
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(fitted, data)
    said = [r.getMessage() for r in caplog.records if _RECOMPUTES in r.getMessage()]
    warned = [str(w.message) for w in record if _REGIONS_UNUSED in str(w.message)]
    if how in ("uncompiled", "regional"):
        assert said == [] and warned == []
        return
    assert len(said) == 1
    assert "at budget 0.75 the blocks cost about 4/3 x 0.75 = 1.00 of their compute" in said[0]
    assert len(warned) == (1 if how == "with_compile_argument" else 0)


@pytest.mark.slow
def test_trainer_user_compiled_resnet_with_batchnorm(tmp_path) -> None:
    counter = CompileCounterWithBackend("aot_eager")
    watch = _GraphsAtEpochEnd(counter)
    torch.manual_seed(0)
    module = ClassifierModule(CifarResNet(8, width=4))
    module.net = torch.compile(module.net, backend=counter, fullgraph=True)  # the callback's probes break no graph
    sd = StochasticDepth(mode="linear", budget=0.5, seed=1)
    trainer = pl.Trainer(max_epochs=3, callbacks=[sd, watch], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(module, image_loader(n=80, batch_size=4))  # 20 steps per epoch: the first one warms up
    # Route "cond", BatchNorm statistics carried through the conds: one graph for training, and one for the
    # first step, when the callback checks the gates' call order with forward hooks. Nothing after.
    assert watch.graphs == [2, 2, 2]


class _UntraceableBlock(nn.Module):
    """fx cannot trace ``if x.dim() == 2`` (a Proxy in control flow): the gate goes into the drop-path slot."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.linear = nn.Linear(8, 8)
        self.drop_path = DropPath(0.0)

    def forward(self, x):
        if x.dim() == 2:
            x = x + self.drop_path(self.linear(x).relu())
        return x


def test_compile_argument_is_checked_before_training() -> None:
    with pytest.raises(ValueError, match="compile must be True/False or a dict"):
        StochasticDepth(compile="yes")  # type: ignore[arg-type]


def test_slot_gates_multiply_by_the_mask_as_data_under_compile() -> None:
    from lightning_sd.core.gates import SlotGate

    torch.manual_seed(0)
    model = nn.Sequential(*[_UntraceableBlock() for _ in range(4)])
    handle, ref, ref_handle = _pair(model)
    assert all(isinstance(g, SlotGate) for g in handle.gates)
    compiled = _Compiled(model)
    counts = _run_pair(model, compiled, ref, handle, ref_handle, torch.randn(3, 8), 24)
    assert counts[-1] == 1

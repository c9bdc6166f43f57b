"""Device correctness: no loss part, regulariser or metric is made on the CPU behind the data's back, a view whose
section is empty still gives a loss, and the main paths (fit step, extraction, VAE forward/backward, training step,
attention) run on CUDA when there is one, equal to the CPU.

Without a GPU, "made on the CPU behind the data's back" is caught by :class:`HostTracker`: it marks every tensor
created without a device taken from the data (``torch.zeros(())``, ``torch.tensor(0.0)``, ``.cpu()``, ...) and
reports an op that mixes such a tensor with the data the way CUDA refuses (a ``torch.stack``/``torch.cat`` of
both, or a host tensor with dimensions next to a data tensor)."""

import weakref
from dataclasses import replace

import pytest
import torch
import trimesh
from torch.overrides import TorchFunctionMode

from sparseflex.data.mesh import Mesh, normalize
from sparseflex.flexicubes.regularizers import sdf_sign_loss, weight_l1
from sparseflex.losses import RenderLossWeights, masked_l1, render_loss, ssim
from sparseflex.render.camera import Camera, intrinsics, look_at

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- the tracker --------------------------------------------------------------------------------------------------------
_JOIN = {torch.stack, torch.cat, torch.concat, torch.hstack, torch.vstack}
_EXEMPT = {"__getitem__", "__setitem__", "copy_", "to", "index_put_", "index_put"}  # host indices/values are allowed


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class HostTracker(TorchFunctionMode):
    """Tensors made on the host without being asked for: factories without a device (or with one not read from a data
    tensor), ``.cpu()``, ``torch.from_numpy``, and whatever is computed from such tensors alone. Tensors that exist
    before the mode starts count as data unless passed to :meth:`host` (a batch fresh from a CPU data loader).
    ``violations`` lists the ops CUDA would refuse; ``is_host`` says whether a result stayed on the host."""

    def __init__(self):
        super().__init__()
        self._host: dict[int, weakref.ref] = {}
        self._data_devices: list = []  # kept alive, so their ids stay theirs
        self.violations: list[str] = []

    def host(self, *objs):
        for t in _tensors(list(objs)):
            self._set(t, True)
        return objs

    def host_constants(self, prefix: str = "sparseflex"):
        """Mark the module-level tensors of the package (lookup tables and the like): they stay on the CPU."""
        import sys
        for name, module in list(sys.modules.items()):
            if name == prefix or name.startswith(prefix + "."):
                self.host(*[v for v in vars(module).values() if isinstance(v, torch.Tensor)])

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _set(self, t, host: bool):
        key = id(t)
        if host:
            self._host[key] = weakref.ref(t, lambda _, key=key: self._host.pop(key, None))
        else:
            self._host.pop(key, None)

    def _device_is_data(self, device) -> bool:
        return any(device is d for d in self._data_devices)

    def __enter__(self):
        self._from_numpy = torch.from_numpy
        tracker = self

        def from_numpy(array):
            return tracker.host(tracker._from_numpy(array))[0]
        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owner = getattr(func, "__self__", None)
        if owner is torch.Tensor.device:  # a device read from a tensor: data unless the tensor is a host one
            if not self.is_host(args[0]):
                self._data_devices.append(out)
            return out
        outs = list(_tensors(out))
        if not outs:
            return out
        inputs = list(_tensors([args, kwargs]))
        name = getattr(func, "__name__", str(func))
        if name == "cpu":
            host = True
        elif kwargs.get("device") is not None:
            host = not self._device_is_data(kwargs["device"])
        elif name == "to" and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            host = not self._device_is_data(args[1])
        elif name == "to" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            host = self.is_host(args[1])
        elif not inputs:
            host = True  # a factory with no device: the default device, the CPU
        else:
            host_in = [t for t in inputs if self.is_host(t)]
            data_in = [t for t in inputs if not self.is_host(t)]
            host = not data_in
            if host_in and data_in and name not in _EXEMPT:
                if func in _JOIN or any(t.dim() for t in host_in):
                    shapes = [tuple(t.shape) for t in host_in]
                    self.violations.append(f"{name}: host tensors {shapes} mixed with data tensors")
        for t in outs:
            self._set(t, host)
        return out


def test_tracker_flags_a_host_zero_stacked_with_data():
    data = torch.ones(3, requires_grad=True)
    with HostTracker() as tr:
        ok = torch.stack([data.sum(), data.new_zeros(()), torch.zeros((), device=data.device), data.mean() * 2])
        scaled = data * torch.tensor(2.0)  # a host scalar in an elementwise op is fine on CUDA
        moved = torch.arange(3).to(data.device) + data
        assert not tr.violations and not any(tr.is_host(t) for t in (ok, scaled, moved))
        torch.stack([data.sum(), torch.zeros(())])
        assert tr.violations and tr.violations[-1].startswith("stack")
        data + torch.ones(3)  # a host vector next to data
        torch.cat([torch.from_numpy(data.detach().numpy()), data])
        assert len(tr.violations) == 3
        assert tr.is_host(torch.tensor(1.0) + 1) and tr.is_host(data.detach().cpu())


# -- losses and regularisers on another device ---------------------------------------------------------------------------
def test_regularisers_and_losses_stay_on_their_inputs_device():
    """The meta device stands in for a GPU here: a CPU result means a tensor made without the inputs' device."""
    meta = dict(device="meta", dtype=torch.float64)
    empty = torch.empty(0, 8, **meta)
    zero = weight_l1(empty, torch.empty(0, 12, **meta), torch.empty(0, **meta))
    assert zero.device.type == "meta" and zero.dtype == torch.float64 and zero.shape == ()
    assert weight_l1(torch.ones(2, 8, **meta)).device.type == "meta"
    assert sdf_sign_loss(torch.zeros(5, **meta), torch.zeros(0, 2, dtype=torch.long, device="meta")).device.type == "meta"
    maps = {"mask": torch.zeros(1, 16, 16, **meta), "depth": torch.zeros(1, 16, 16, **meta),
            "normal": torch.zeros(1, 16, 16, 3, **meta)}
    total, parts = render_loss(maps, maps, RenderLossWeights())
    assert {t.device.type for t in [total, *parts.values()]} == {"meta"}
    assert render_loss(maps, maps, RenderLossWeights(0, 0, 0, 0))[0].device.type == "meta"  # no term at all
    assert ssim(maps["normal"].permute(0, 3, 1, 2), maps["normal"].permute(0, 3, 1, 2)).device.type == "meta"
    assert masked_l1(maps["depth"], maps["depth"], maps["mask"]).device.type == "meta"


# -- a view whose section is empty ---------------------------------------------------------------------------------------
def torus():
    return normalize(Mesh.from_trimesh(trimesh.creation.torus(0.3, 0.12)))[0]


def away_camera(size=48, device=None):
    """At z = 2 looking further away along +z: the shape lies behind it, so its section holds no voxel."""
    eye = torch.tensor([[0.0, 0.0, 2.0]])
    cam = Camera(intrinsics(40, size, size)[None], look_at(eye, torch.tensor([[0.0, 0.0, 5.0]])), size, size, 0.1, 5.0)
    return cam.to(device)


@pytest.fixture(scope="module")
def torus_sf():
    from sparseflex.fit.convert import mesh_to_sparseflex
    gt = torus()
    return gt, mesh_to_sparseflex(gt, 16, num_points=20_000)


@pytest.mark.parametrize("case", ["camera looking away", "tiny visibility ratio", "normal view"])
def test_empty_section_gives_zero_parts_on_the_data_device(torus_sf, case):
    from sparseflex.fit.sectional import sectional_render_loss
    from sparseflex.render.camera import random_views
    gt, sf = torus_sf
    sf = replace(sf, **{k: v.detach().requires_grad_() for k, v in sf.parameters_dict().items()})
    cam = away_camera() if case == "camera looking away" else random_views(1, torch.Generator().manual_seed(1), size=48)
    ratio = 1e-6 if case == "tiny visibility ratio" else 0.5
    with HostTracker() as tr:
        tr.host_constants()
        tr.host(gt.vertices, gt.faces, cam.K, cam.extrinsics, cam.near, cam.far)
        cam = cam.to(sf.sdf.device)
        mesh = gt.to(sf.sdf.device)
        total, parts = sectional_render_loss(sf, mesh, cam, ratio, 0.3, RenderLossWeights(), 0.5, 0.01, 1e-3,
                                             backend="torch")  # the renderer CUDA uses
    assert not tr.violations, tr.violations
    assert {"mask", "depth", "normal", "ssim", "sign", "l1"} <= set(parts)
    for k, v in parts.items():
        assert not tr.is_host(v), k
        assert v.shape == () and v.dtype == sf.sdf.dtype and v.device == sf.sdf.device and torch.isfinite(v), k
    if case == "camera looking away":
        assert total.item() == 0 and all(v.item() == 0 for v in parts.values())
    else:
        assert total.requires_grad
        total.backward()
        assert sf.sdf.grad is not None


def test_vae_loss_survives_a_view_with_an_empty_section(monkeypatch, tmp_path):
    """The crash on CUDA: one view's section empty, its ``l1`` a CPU zero, stacked with the other view's."""
    from sparseflex.train import vae_task
    from test_train import TINY8, prepared_item, vae_config

    class FirstViewLooksAway(vae_task.ViewSampler):
        calls = 0

        def sample(self, kind=None):
            FirstViewLooksAway.calls += 1
            if FirstViewLooksAway.calls % 2:
                return "outside", away_camera(self.size, self.points.device)
            return super().sample(kind)

    monkeypatch.setattr(vae_task, "ViewSampler", FirstViewLooksAway)
    task = vae_task.VAETask(vae_config(views_per_item=2, backend="torch", model_overrides=TINY8))
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():  # a non-zero head, so that the other views have a surface to render
        model.decoder.out_layer.weight.normal_(0, 0.05)
        model.decoder.out_layer.bias[:8] = 0.2
    item = prepared_item(tmp_path, torus(), "torus")
    batch = task.collate([item])
    batch["seeds"], batch["step"] = [1], 0
    with HostTracker() as tr:
        tr.host_constants()
        tr.host(batch)
        total, parts = task.loss(model, batch)
    assert not tr.violations, tr.violations
    assert FirstViewLooksAway.calls == 2
    assert set(parts) == set(task.part_names()) and parts["mask"] > 0 and parts["l1"] > 0
    assert not any(tr.is_host(v) for v in [total, *parts.values()])
    assert torch.isfinite(total)
    total.backward()


def test_fit_and_training_steps_make_nothing_on_the_host(tmp_path):
    from sparseflex.fit.fitter import FitConfig, Fitter
    from sparseflex.train.trainer import Trainer
    from sparseflex.train.vae_task import VAETask
    from test_train import prepared_item, vae_config
    fitter = Fitter(torus(), FitConfig(resolution=16, iterations=4, image_size=48, checkpoint_every=0,
                                       backend="torch"))
    config = vae_config(steps=2, batch_size=1, views_per_item=2, backend="torch", ema_decay=0.9)
    items = [prepared_item(tmp_path, torus(), "torus")]
    trainer = Trainer(VAETask(config), items, config, tmp_path / "run", device="cpu", quiet=True)
    batch = trainer.task.collate(items)
    batch["seeds"] = [3]
    with HostTracker() as tr:
        tr.host_constants()
        for _ in range(3):
            fitter.step()
        tr.host(batch)
        loss, parts, _ = trainer.train_step(batch)
    assert not tr.violations, tr.violations
    assert loss == loss and set(parts) == set(trainer.task.part_names())


# -- the main paths on every device (CUDA when present) -------------------------------------------------------------------
def test_extraction_on_device(device):
    from sparseflex.flexicubes import SparseFlex
    from sparseflex.sparse import dense_grid
    res = 24
    coords = dense_grid(res)
    centres = (coords[:, 1:].double() + 0.5) / res - 0.5
    coords = coords[(centres.norm(dim=1) - 0.3).abs() < 1.5 / res]
    fn = lambda p: p.norm(dim=1) - 0.3  # noqa: E731
    ref = SparseFlex.from_sdf(coords, res, fn).extract()
    ex = SparseFlex.from_sdf(coords.to(device), res, fn).extract()
    assert ex.vertices.device.type == device.type and ex.faces.device.type == device.type
    assert torch.equal(ex.faces.cpu(), ref.faces)
    assert torch.allclose(ex.vertices.cpu(), ref.vertices, atol=1e-5)


def test_vae_forward_backward_on_device(device):
    from sparseflex.models import SparseFlexVAE, mesh_inputs
    torch.manual_seed(0)
    model = SparseFlexVAE("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(2, radius=0.4))
    inp = mesh_inputs(mesh, 8, 1500, seed=0)
    results = {}
    for dev in {torch.device("cpu"), device}:
        m = model.to(dev)
        m.zero_grad(set_to_none=True)
        dec, mean, logvar = m(inp.points.to(dev), inp.normals.to(dev), inp.point_batch.to(dev), inp.coords.to(dev),
                              resolution=8)
        loss = dec.head.square().mean() + mean.feats.square().mean() + logvar.feats.mean()
        loss.backward()
        assert dec.head.device.type == dev.type
        results[dev.type] = (dec.head.detach().cpu(), loss.item(), m.decoder.out_layer.weight.grad.cpu())
    cpu, dev = results["cpu"], results[device.type]
    assert torch.allclose(dev[0], cpu[0], atol=1e-4) and dev[1] == pytest.approx(cpu[1], rel=1e-4)
    assert torch.allclose(dev[2], cpu[2], atol=1e-4, rtol=1e-3)


def test_fit_step_on_device(device):
    from sparseflex.fit.fitter import FitConfig, Fitter
    fitter = Fitter(torus(), FitConfig(resolution=16, iterations=4, image_size=48, checkpoint_every=0), device=device)
    for _ in range(3):
        kind, total, parts = fitter.step()
        assert isinstance(total, float) and total == total and set(parts) >= {"mask", "sign", "l1"}
    assert fitter.state.sf.sdf.device.type == device.type


def test_training_step_on_device(device, tmp_path):
    from sparseflex.train.trainer import Trainer
    from sparseflex.train.vae_task import VAETask
    from test_train import prepared_item, vae_config
    items = [prepared_item(tmp_path, torus(), "torus")]
    config = vae_config(steps=2, batch_size=2, views_per_item=2, amp=True)
    trainer = Trainer(VAETask(config), items, config, tmp_path / "run", device=device, quiet=True)
    trainer.run()
    history = trainer.history()
    assert len(history) == 2 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in history)
    assert next(trainer.model.parameters()).device.type == device.type


# -- CUDA only: the GPU attention layouts against the CPU reference -------------------------------------------------------
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_attention_layouts_equal_the_cpu_reference(dtype):
    from sparseflex.nn import SparseTensor, SparseWindowSelfAttention, attention
    from sparseflex.sparse import dense_grid
    coords = dense_grid(24)
    coords = coords[torch.rand(len(coords)) < 0.2]
    x = SparseTensor(coords, torch.randn(len(coords), 64))
    layer = SparseWindowSelfAttention(64, 2, 8, 4)
    ref = layer(x).feats
    feats = x.feats.cuda().requires_grad_()
    gpu_layer = layer.cuda()
    results = {}
    for backend in ("auto", "buckets", "pow2") + (("varlen",) if dtype != torch.float32 else ()):
        with attention.attention_backend(backend), torch.autocast("cuda", dtype=dtype,
                                                                   enabled=dtype != torch.float32):
            out = gpu_layer(SparseTensor(coords.cuda(), feats)).feats
        grad, = torch.autograd.grad(out.float().square().sum(), feats)
        results[backend] = (out.float().cpu(), grad.cpu())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for backend, (out, grad) in results.items():
        assert torch.allclose(out, ref, atol=tol, rtol=tol), backend
        assert torch.allclose(grad, results["buckets"][1], atol=tol * 10, rtol=tol * 10), backend

"""Build the dynamic teacher: a plain, wider copy of a model computing the same function."""
import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from .branches import CBRConv2d
from .expansion import ChannelMap, TensorPlan, symmetry_noise, widen_tensor, widened_size
from .rules import ModulePlan, RuleContext, get_rule, reads_segments, unsupported_reason
from .spaces import ChannelSpaces, trace_channel_spaces

DEFAULT_NOISE = 0.01
CHECK_IMG_SIZE = 32


@dataclass
class ExpansionPlan:
    tensors: Dict[str, TensorPlan]  # full parameter / buffer name -> plan
    attrs: List[Tuple[str, str, object]]  # (module path, attribute, new value)
    stem: Tuple[str, ...]
    classifier: Tuple[str, ...]
    noiseless: Set[str] = field(default_factory=set)  # full names of tensors that get no symmetry noise
    widths: Dict[int, int] = field(default_factory=dict)  # student channel count -> DT width
    # module path -> per call, the map of its input where that input is several segments (a
    # concatenation), else None: where the DT's copy of the student's channels is, for the culprit search
    segmented_inputs: Dict[str, List[Optional[ChannelMap]]] = field(default_factory=dict)


def whole_group_widths(model: nn.Module, ratio: float, stem: Sequence[str] = ()) -> Dict[int, int]:
    """DT widths of the channel counts that grouped convs split into groups, rounded up to whole groups.

    A DT group must copy one student group, so a count of C channels in groups of g widens to a
    multiple of g: ``ceil(round(C * ratio) / g) * g`` (the lcm of every group size met for C).
    Widths are chosen per channel count, so every tensor touching an activation agrees on it;
    the ratio becomes a target. Integer ratios are multiples already and change nothing.
    """
    multiple: Dict[int, int] = {}
    for path, m in model.named_modules():
        groups = getattr(m, 'groups', 1)
        sizes = (getattr(m, 'in_channels', None), getattr(m, 'out_channels', None))
        if (not isinstance(groups, int) or groups <= 1 or path in stem
                or not all(isinstance(w, int) and w % groups == 0 for w in sizes)):
            continue
        for count in (m.in_channels, m.out_channels):
            multiple[count] = math.lcm(multiple.get(count, 1), count // groups)
    widths = {}
    for count, q in multiple.items():
        wide = widened_size(count, ratio)
        if q > 1 and wide % q:
            widths[count] = -(-wide // q) * q
    return widths


def validate_ratio(ratio) -> float:
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f'gpd_ratio must be a number > 1, got {ratio!r}') from None
    if not math.isfinite(value) or value <= 1.0:
        raise ValueError(f'gpd_ratio must be a finite number > 1 (the dynamic teacher is wider), got {ratio!r}')
    return value


def _join(prefix: str, name: str) -> str:
    return '.'.join(p for p in (prefix, name) if p)


def _cfg_paths(model: nn.Module, key: str) -> Tuple[str, ...]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    value = cfg.get(key)
    if not value:
        return ()
    paths = (value,) if isinstance(value, str) else tuple(value)
    modules = dict(model.named_modules())
    return tuple(p for p in paths if p in modules)


def find_stem_and_classifier(model: nn.Module) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """Module paths whose input is the image (stem) and whose output is the logits (classifier).

    timm's ``pretrained_cfg`` names them (``first_conv`` / ``classifier``); for other models the
    first conv / linear is the stem and ``get_classifier()`` (or the last linear) the classifier.
    """
    stem = _cfg_paths(model, 'first_conv')
    classifier = _cfg_paths(model, 'classifier')
    named = list(model.named_modules())
    if not stem:
        stem = tuple(n for n, m in named if isinstance(m, (nn.Conv2d, nn.Linear, CBRConv2d)))[:1]
    if not classifier and hasattr(model, 'get_classifier'):
        head = model.get_classifier()
        classifier = tuple(n for n, m in named if m is head)
    if not classifier:
        classifier = tuple(n for n, m in named if isinstance(m, nn.Linear))[-1:]
    for path in classifier:
        head = model.get_submodule(path)
        if not any(True for _ in head.parameters()):
            raise ValueError(
                f'The classifier {path!r} of {type(model).__name__} has no weights (num_classes=0?): '
                'GPD needs a classification head.')
    if not stem:
        raise ValueError(f'Could not find the stem (first conv / linear) of {type(model).__name__}')
    return stem, classifier


def _refuse_unsupported(model: nn.Module):
    for path, module in model.named_modules():
        reason = unsupported_reason(module)
        if reason:
            raise NotImplementedError(f'{path or "<model>"} ({type(module).__name__}) {reason}: '
                                      'inverse reparameterization does not support it')


def channel_spaces(model: nn.Module, stem: Sequence[str]) -> ChannelSpaces:
    """The channel segments of every module's input and output, traced on the check input
    (blocks refused up front are refused before this forward)."""
    _refuse_unsupported(model)
    x = check_input(model, stem, batch=1)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return trace_channel_spaces(model, x if param is None else x.to(param.dtype))


def _segmented(sizes) -> bool:
    return sizes is not None and len(sizes) > 1


def check_segments(path: str, module: nn.Module, rule, in_sizes, out_sizes, spaces: ChannelSpaces):
    """Refuse a module whose channels arrive in several segments (concatenated or split by count)
    when its rule lays channels out as one block, or when a cut falls inside one of its groups."""
    name = f'{path or "<model>"} ({type(module).__name__})'
    if path in spaces.errors:
        raise NotImplementedError(f'{name}: {spaces.errors[path]}: inverse reparameterization does not support it')
    if (_segmented(in_sizes) or _segmented(out_sizes)) and not reads_segments(rule):
        sizes = in_sizes if _segmented(in_sizes) else out_sizes
        raise NotImplementedError(
            f'{name} sees channels concatenated or split by count (parts of {list(sizes)} channels) and its '
            'inverse reparameterization rule lays channels out as one block: inverse reparameterization '
            'does not support it')


def plan_expansion(model: nn.Module, ratio: float) -> ExpansionPlan:
    """Walk ``model`` and collect how every tensor widens; raises on anything not covered."""
    ratio = validate_ratio(ratio)
    stem, classifier = find_stem_and_classifier(model)
    plan = ExpansionPlan({}, [], stem, classifier)
    plan.widths.update(whole_group_widths(model, ratio, stem))
    spaces = channel_spaces(model, stem)

    def visit(path: str, module: nn.Module):
        reason = unsupported_reason(module)
        if reason:
            raise NotImplementedError(f'{path or "<model>"} ({type(module).__name__}) {reason}: '
                                      'inverse reparameterization does not support it')
        rule = get_rule(module)
        if rule is None:
            own = list(module._parameters.items()) + list(module._buffers.items())
            if any(t is not None for _, t in own):
                raise NotImplementedError(
                    f'{path or "<model>"} ({type(module).__module__}.{type(module).__name__}) has tensors of its own '
                    f'and no inverse reparameterization rule; register one with timm_gpd.register_rule')
            handled = set()
        else:
            in_sizes, out_sizes = spaces.io.get(path, (None, None))
            check_segments(path, module, rule, in_sizes, out_sizes, spaces)
            ctx = RuleContext(path, ratio, expand_in=path not in stem, expand_out=path not in classifier,
                              widths=plan.widths, in_sizes=in_sizes, out_sizes=out_sizes, spaces=spaces.io)
            mp: ModulePlan = rule(module, ctx)
            for name, tplan in mp.tensors.items():
                if tplan.dims:
                    plan.tensors[_join(path, name)] = tplan
            plan.noiseless.update(_join(path, name) for name in mp.noiseless)
            for name, value in mp.attrs.items():
                sub, _, attr = name.rpartition('.')
                plan.attrs.append((_join(path, sub), attr, value))
            handled = mp.handled
        for name, child in module.named_children():
            if name not in handled:
                visit(_join(path, name), child)

    visit('', model)
    if not plan.tensors:
        raise ValueError(f'ratio {ratio} adds no channel anywhere in {type(model).__name__}')
    for path, calls in spaces.calls.items():
        if any(_segmented(s) for s in calls):
            plan.segmented_inputs[path] = [
                ChannelMap(tuple(s), tuple(plan.widths.get(n, widened_size(n, ratio)) for n in s)) if _segmented(s)
                else None for s in calls]
    return plan


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor):
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def build_wide_model(
        model: nn.Module,
        plan: ExpansionPlan,
        noise: float = DEFAULT_NOISE,
        seed: int = 0,
) -> nn.Module:
    """A deep copy of ``model`` with every tensor widened by ``plan`` plus exact symmetry noise.

    ``noise`` is relative to each weight's standard deviation and is added to every layer's
    ``weight``; it sums to zero over the copies of every input channel, so neither the function
    nor the student view changes.
    """
    wide = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for full_name, tplan in plan.tensors.items():
            path, _, name = full_name.rpartition('.')
            module = wide.get_submodule(path)
            old = getattr(module, name)
            value = widen_tensor(old.detach(), tplan)
            # the main kernel of each layer is enough to let the copies diverge; CBR's extra
            # branch tensors stay exact replicas (noising them too only costs build time)
            if (name == 'weight' and name in module._parameters and noise > 0 and old.numel() > 1
                    and full_name not in plan.noiseless):
                scale = float(old.detach().float().std()) * noise
                extra = symmetry_noise(value, tplan, scale, generator)
                if extra is not None:
                    value = value + extra.to(value.dtype)
            _replace_tensor(module, name, value.contiguous())
        for path, attr, value in plan.attrs:
            setattr(wide.get_submodule(path), attr, value)
    _update_feature_widths(model, wide, plan.classifier)
    if uses_channels_last(model):
        wide.to(memory_format=torch.channels_last)  # widening writes contiguous tensors
    return wide


def uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's conv kernels are laid out channels_last (``model.to(memory_format=...)``)."""
    for p in model.parameters():
        # the first kernel whose two layouts differ (a k x k kernel over several input channels) tells
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _in_width(module: nn.Module) -> Optional[int]:
    return getattr(module, 'in_features', getattr(module, 'in_channels', None))


def _update_feature_widths(model: nn.Module, wide: nn.Module, classifier: Sequence[str]):
    """timm keeps the head's input width on the model (``num_features``): keep it true for the DT."""
    if not classifier:
        return
    before = _in_width(model.get_submodule(classifier[0]))
    after = _in_width(wide.get_submodule(classifier[0]))
    for attr in ('num_features', 'head_hidden_size'):
        if before is not None and getattr(model, attr, None) == before:
            setattr(wide, attr, after)


def check_input(model: nn.Module, stem: Sequence[str], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random image batch the model accepts (its fixed size, else the smallest that runs)."""
    first = model.get_submodule(stem[0])
    in_chans = getattr(first, 'in_channels', getattr(first, 'in_features', 3))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size', (in_chans, 224, 224))[1:]
    patch_embed = getattr(model, 'patch_embed', None)
    fixed = cfg.get('fixed_input_size', False) or (
        patch_embed is not None and getattr(patch_embed, 'strict_img_size', False))
    if patch_embed is not None and getattr(patch_embed, 'img_size', None):
        size = tuple(patch_embed.img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    default = tuple(size)
    # the stem conv may not see the image itself (TResNet's space-to-depth feeds it 16 x 3
    # channels): the model's own in_chans / its cfg's are the other candidates
    candidates = [in_chans] + [c for c in (getattr(model, 'in_chans', None), cfg.get('input_size', (None,))[0])
                               if isinstance(c, int) and c != in_chans]
    for chans in candidates:
        # a model built for another size than its cfg's (LeViT(img_size=32)) fails at the cfg's: search
        if fixed and (patch_embed is not None or _accepts(model, chans, default)):
            size = default
        else:
            size = smallest_input_size(model, chans, cfg, default=default)
        if len(candidates) == 1 or _accepts(model, chans, size):
            in_chans = chans
            break
    else:
        in_chans, size = candidates[0], default
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, *size, generator=generator).to(device)


def smallest_input_size(model: nn.Module, in_chans: int, cfg: dict, default: Tuple[int, int]) -> Tuple[int, int]:
    """The smallest square size from CHECK_IMG_SIZE up that the model's forward accepts.

    Stems of Inception-v4 / Inception-ResNet-v2 shrink 32 px to nothing; a small input keeps the
    check cheap for the rest. ``pretrained_cfg['min_input_size']`` is honoured when set; the
    model's default size is the answer when no smaller one runs.
    """
    low = max(CHECK_IMG_SIZE, *(cfg.get('min_input_size') or (0, 0, 0))[1:])
    candidates = sorted({s for s in (32, 64, 96, 128, 160, 224) if s >= low} | {low})
    candidates = [s for s in candidates if s < max(default)] or [low]
    for s in candidates:
        if _accepts(model, in_chans, (s, s)):
            return s, s
    return default


def _accepts(model: nn.Module, in_chans: int, size: Tuple[int, int]) -> bool:
    """Whether an eval-mode forward of one image of ``size`` runs (too small for a stem or a
    pooling, or not the size a fixed-size model was built for, raises)."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device('cpu')
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *size, dtype=dtype, device=device))
        return True
    except Exception:
        return False
    finally:
        for m, training in modes:
            m.training = training


def max_logit_error(reference: torch.Tensor, other: torch.Tensor) -> Tuple[float, float]:
    """Max abs difference and the tolerance the project uses for 'same function' in fp32."""
    err = (reference.float() - other.float()).abs().max().item()
    tol = 1e-4 * max(1.0, reference.float().abs().max().item())
    return err, tol


def _first_copy(wide: torch.Tensor, shape: torch.Size) -> Optional[torch.Tensor]:
    if wide.ndim != len(shape) or any(w < s for w, s in zip(wide.shape, shape)):
        return None
    for dim, size in enumerate(shape):
        wide = wide.narrow(dim, 0, size)
    return wide


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def locate_mismatch(narrow: nn.Module, wide: nn.Module, x: torch.Tensor, tol: float,
                    segmented: Optional[Dict[str, List[Optional[ChannelMap]]]] = None) -> Optional[str]:
    """Path and type of the module whose forward first hands a child channels that are not
    replicas of the student's: that module's own code (a concat, a shuffle...) mixes channels.
    ``segmented``: per module and call, where its input is several segments, its map (the
    student's channels are then the primary positions of each segment, not the first ones)."""
    inputs: Dict[str, List[List[torch.Tensor]]] = {}  # per module, the inputs of each call
    calls: Dict[str, int] = {}

    class _Found(Exception):
        pass

    def record(path):
        def hook(_, args):
            # cloned: a later in-place op (ReLU(inplace=True), +=) would change what was recorded
            inputs.setdefault(path, []).append([t.clone() for t in _tensors(args)])
        return hook

    def compare(path):
        def hook(_, args):
            # call by call: a module used several times (a shared activation) sees other shapes
            call = calls[path] = calls.get(path, -1) + 1
            recorded = inputs.get(path, [])
            if call >= len(recorded):
                return
            maps = (segmented or {}).get(path) or []
            cmap = maps[call] if call < len(maps) else None
            for ref, got in zip(recorded[call], _tensors(args)):
                if (cmap is not None and got.ndim > 1 and ref.ndim == got.ndim and got.shape[1] == cmap.wide_size
                        and ref.shape[1] == cmap.size):
                    got = got.index_select(1, cmap.primary_index().to(got.device))
                got = _first_copy(got, ref.shape)
                if got is None or (got.float() - ref.float()).abs().max().item() > tol:
                    raise _Found(path)
        return hook

    handles = []
    try:
        handles += [m.register_forward_pre_hook(record(p)) for p, m in narrow.named_modules()]
        with torch.no_grad():
            narrow(x)
        for h in handles:
            h.remove()
        handles = [m.register_forward_pre_hook(compare(p)) for p, m in wide.named_modules()]
        with torch.no_grad():
            wide(x)
    except _Found as found:
        path = found.args[0]
        parent_path = path.rpartition('.')[0]
        parent = wide.get_submodule(parent_path)
        return f'{parent_path or "<model>"} ({type(parent).__name__})'
    finally:
        for h in handles:
            h.remove()
    return None


def check_function_preserved(narrow: nn.Module, wide: nn.Module, x: torch.Tensor, what: str = 'dynamic teacher',
                             inputs: Optional[Dict[str, List[Optional[ChannelMap]]]] = None):
    """Eval-mode fp32 check that ``wide`` computes what ``narrow`` does; raises with the culprit."""
    modes = [(m, m.training) for net in (narrow, wide) for m in net.modules()]
    narrow.eval()
    wide.eval()
    try:
        with torch.no_grad():
            ref = narrow(x)
            try:
                out = wide(x)
            except Exception as e:  # a shape error deep in some block's forward: say what it means
                detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
                raise NotImplementedError(
                    f'The {what} fails in its forward ({type(e).__name__}: {detail}): some block splits, reshapes '
                    'or concatenates channels by a count that the inverse reparameterization rules do not widen') from e
        err, tol = max_logit_error(ref, out)
        if out.shape == ref.shape and err <= tol:
            return
        culprit = locate_mismatch(narrow, wide, x, tol, inputs)
        if culprit is not None:
            raise NotImplementedError(
                f'{culprit} combines channels in its forward in a way the inverse reparameterization rules do '
                f'not cover (e.g. concatenation or shuffling), so the {what} would compute a different function')
        raise RuntimeError(
            f'The {what} does not reproduce the student: max |logit diff| {err:.3g} > tolerance {tol:.3g}')
    finally:
        for m, training in modes:
            m.training = training


def inverse_reparameterize(
        model: nn.Module,
        ratio: float = 2.0,
        noise: float = DEFAULT_NOISE,
        seed: int = 0,
        check: bool = True,
) -> nn.Module:
    """A plain copy of ``model`` with every internal channel dimension widened by ``ratio``,
    computing the same function (checked on a random input unless ``check=False``)."""
    plan = plan_expansion(model, ratio)
    wide = build_wide_model(model, plan, noise=noise, seed=seed)
    if check:
        check_function_preserved(model, wide, check_input(model, plan.stem), inputs=plan.segmented_inputs)
    return wide

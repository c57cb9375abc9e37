"""What a backend is. fusedclip/backends/__init__.py registers them and resolves a name per call; the public
functions call only what is declared here."""


class Backend:
    """The protocol every backend implements (as a class of static methods; the registry holds the classes).

    Required:
        name (str): what users pass as backend=.
        available(device_type) -> (bool, str): whether it runs on tensors of that device type, and why not.
        total_norm(tensors, norm_type, per_tensor=None, out_dtype=None) -> Tensor: the 0-dim norm of the tensors
            in the accumulation dtype (fp32; fp64 when any tensor is fp64), unrounded with out_dtype=float64.
        clip(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None) -> Tensor: the norm and
            the scaling in place, the norm in the promotion of the gradients' dtypes.
        scale(grads, max_norm, total_norm): the scaling alone, by a given norm.
        clamp(grads, clip_value): clip_value_.
        Every method takes a non-empty list of tensors on one device.

    Declared capabilities (class attributes: callers read them and never probe for methods):
        fused_extras: clip and total_norm take per_tensor, inv_scale and found_inf in their own pass.
        fused_zclip: zclip(grads, state, config, norm=None, inv_scale=None, found_inf=None, coef_out=None) runs
            ZClip's step (csrc/common/zclip_rule.h) in the fused pass.
        fused_agc: agc(weights, grads, clip_factor, eps, norm_type) runs adaptive gradient clipping.
        fused_scale_each: scale_each(grads, coefs) scales each tensor by its own coefficient.
        delegates_to_torch: the public functions hand the call to torch.nn.utils unchanged (backend="torch");
            such a backend implements none of the methods above.
    """

    name = None
    fused_extras = False
    fused_zclip = False
    fused_agc = False
    fused_scale_each = False
    delegates_to_torch = False

    @staticmethod
    def available(device_type):
        raise NotImplementedError

    @staticmethod
    def total_norm(tensors, norm_type, per_tensor=None, out_dtype=None):
        raise NotImplementedError

    @staticmethod
    def clip(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None):
        raise NotImplementedError

    @staticmethod
    def scale(grads, max_norm, total_norm):
        raise NotImplementedError

    @staticmethod
    def clamp(grads, clip_value):
        raise NotImplementedError

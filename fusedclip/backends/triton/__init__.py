"""backend="triton": the fused clip, ZClip and AGC written in Triton.

kernels.py   the device code (@triton.jit): shared helpers, the clip kernels
launcher.py  the host code the launchers share: the table, workspaces, programs per SM, compiled variants
clip.py      the norm, clip, scale and clamp launchers and their operators (fusedclip_triton::*)
zclip.py     ZClip's step: its kernel, launcher and operator
agc.py       adaptive gradient clipping: its kernel, launcher and operator
backend.py   TritonBackend over those operators; importing it imports all of them (fusedclip.backends.load_triton)

Nothing is imported here, so `import fusedclip` never imports Triton until load_triton asks for it.
"""

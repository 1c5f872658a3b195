// Shared helpers for Windflow's RawKernels (a .cu so packaging ships it; never compiled
// alone). Prepended to every kernel source by
// kernels/sources.py, so the sources compile with NVRTC and no CUDA headers.
// bfloat16 is handled as raw 16-bit storage: load widens to float, store rounds to
// nearest-even, which is what torch does when it casts float32 to bfloat16.
struct wf_bf16 { unsigned short bits; };

__device__ __forceinline__ float wf_load(const float* p) { return *p; }
__device__ __forceinline__ float wf_load(const wf_bf16* p) {
    return __uint_as_float(((unsigned int)p->bits) << 16);
}
__device__ __forceinline__ void wf_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void wf_store(wf_bf16* p, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a quiet NaN
        p->bits = (unsigned short)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p->bits = (unsigned short)(u >> 16);
}

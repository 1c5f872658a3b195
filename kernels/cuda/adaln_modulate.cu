// Fused adaLN modulate: LayerNorm over the channel axis (no affine), then
// y = norm(x) * (1 + scale) + shift with one scale/shift vector per (batch, frame).
// One thread block per token row; x is (rows, C) with rows = B * F * S.
template <typename T>
__device__ void adaln_modulate_impl(const T* x, const float* shift, const float* scale, T* out,
                                    int tokens_per_frame, int C, float eps) {
    __shared__ float red_sum[32];
    __shared__ float red_sq[32];
    long long row = blockIdx.x;
    const T* xr = x + row * C;
    T* yr = out + row * C;
    long long frame = row / tokens_per_frame;
    const float* sh = shift + frame * C;
    const float* sc = scale + frame * C;

    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += wf_load(xr + c);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) red_sum[warp] = s;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < nwarps; ++w) total += red_sum[w];
    float mean = total / (float)C;

    float q = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = wf_load(xr + c) - mean;
        q += d * d;
    }
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    if (lane == 0) red_sq[warp] = q;
    __syncthreads();
    float var = 0.0f;
    for (int w = 0; w < nwarps; ++w) var += red_sq[w];
    float rstd = rsqrtf(var / (float)C + eps);

    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = (wf_load(xr + c) - mean) * rstd;
        wf_store(yr + c, v * (1.0f + sc[c]) + sh[c]);
    }
}

extern "C" __global__ void adaln_modulate_f32(const float* x, const float* shift,
                                              const float* scale, float* out,
                                              int tokens_per_frame, int C, float eps) {
    adaln_modulate_impl(x, shift, scale, out, tokens_per_frame, C, eps);
}

extern "C" __global__ void adaln_modulate_bf16(const wf_bf16* x, const float* shift,
                                               const float* scale, wf_bf16* out,
                                               int tokens_per_frame, int C, float eps) {
    adaln_modulate_impl(x, shift, scale, out, tokens_per_frame, C, eps);
}

// Fused few-step flow-matching update: x0 = x - sigma * flow, then re-noised to the next
// timestep, out = (1 - sigma_next) * x0 + sigma_next * noise. With has_noise == 0 the
// output is x0 itself (the last step of a chunk).
template <typename T>
__device__ void sampler_update_impl(const T* x, const T* flow, const T* noise, T* out,
                                    float sigma, float sigma_next, int has_noise,
                                    long long n) {
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float x0 = wf_load(x + i) - sigma * wf_load(flow + i);
        float y = x0;
        if (has_noise) {
            y = (1.0f - sigma_next) * x0 + sigma_next * wf_load(noise + i);
        }
        wf_store(out + i, y);
    }
}

extern "C" __global__ void sampler_update_f32(const float* x, const float* flow,
                                              const float* noise, float* out, float sigma,
                                              float sigma_next, int has_noise, long long n) {
    sampler_update_impl(x, flow, noise, out, sigma, sigma_next, has_noise, n);
}

extern "C" __global__ void sampler_update_bf16(const wf_bf16* x, const wf_bf16* flow,
                                               const wf_bf16* noise, wf_bf16* out, float sigma,
                                               float sigma_next, int has_noise, long long n) {
    sampler_update_impl(x, flow, noise, out, sigma, sigma_next, has_noise, n);
}

// 3D rotary embedding on interleaved pairs of the head dimension. x is (B, L, H, D) with
// L = F * Hp * Wp tokens in (frame, row, column) order. The first nf pairs rotate by the
// frame position, the next nh by the row, the last nw by the column. The cos/sin tables
// are (F, nf), (Hp, nh), (Wp, nw), built by the torch side so both paths share them.
template <typename T>
__device__ void rope_apply_impl(const T* x, T* out, const float* cos_f, const float* sin_f,
                                const float* cos_h, const float* sin_h, const float* cos_w,
                                const float* sin_w, int Hp, int Wp, int heads, int D, int nf,
                                int nh, int nw, long long total_pairs, long long L) {
    int pairs = D / 2;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total_pairs;
         i += stride) {
        int j = (int)(i % pairs);
        long long tok = (i / pairs / heads) % L;
        int w = (int)(tok % Wp);
        int h = (int)((tok / Wp) % Hp);
        int f = (int)(tok / ((long long)Wp * Hp));
        float c, s;
        if (j < nf) {
            c = cos_f[f * nf + j];
            s = sin_f[f * nf + j];
        } else if (j < nf + nh) {
            c = cos_h[h * nh + (j - nf)];
            s = sin_h[h * nh + (j - nf)];
        } else {
            c = cos_w[w * nw + (j - nf - nh)];
            s = sin_w[w * nw + (j - nf - nh)];
        }
        float a = wf_load(x + 2 * i);
        float b = wf_load(x + 2 * i + 1);
        wf_store(out + 2 * i, a * c - b * s);
        wf_store(out + 2 * i + 1, a * s + b * c);
    }
}

#define WF_ROPE_ARGS(T)                                                                      \
    const T *x, T *out, const float *cos_f, const float *sin_f, const float *cos_h,           \
        const float *sin_h, const float *cos_w, const float *sin_w, int Hp, int Wp, int heads, \
        int D, int nf, int nh, int nw, long long total_pairs, long long L

extern "C" __global__ void rope_apply_f32(WF_ROPE_ARGS(float)) {
    rope_apply_impl(x, out, cos_f, sin_f, cos_h, sin_h, cos_w, sin_w, Hp, Wp, heads, D, nf,
                    nh, nw, total_pairs, L);
}

extern "C" __global__ void rope_apply_bf16(WF_ROPE_ARGS(wf_bf16)) {
    rope_apply_impl(x, out, cos_f, sin_f, cos_h, sin_h, cos_w, sin_w, Hp, Wp, heads, D, nf,
                    nh, nw, total_pairs, L);
}

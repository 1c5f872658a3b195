// Decode tail: the VAE's RGB in [-1, 1], planar (B, 3, H, W), to packed uint8 (B, H, W, 3)
// with clamping and round-half-to-even (as torch.round); and packed RGB to planar I420
// (BT.601 limited range, 2x2 chroma averaging) for the video encoder. H and W are even.
template <typename T>
__device__ void decode_to_uint8_impl(const T* rgb, unsigned char* out, long long hw,
                                     long long total) {
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        long long c = i % 3;
        long long p = (i / 3) % hw;
        long long b = i / 3 / hw;
        float v = wf_load(rgb + (b * 3 + c) * hw + p);
        v = fminf(fmaxf(v, -1.0f), 1.0f);
        out[i] = (unsigned char)rintf((v + 1.0f) * 127.5f);
    }
}

extern "C" __global__ void decode_to_uint8_f32(const float* rgb, unsigned char* out,
                                               long long hw, long long total) {
    decode_to_uint8_impl(rgb, out, hw, total);
}

extern "C" __global__ void decode_to_uint8_bf16(const wf_bf16* rgb, unsigned char* out,
                                                long long hw, long long total) {
    decode_to_uint8_impl(rgb, out, hw, total);
}

// One thread per 2x2 block: writes its 4 luma samples and one U and one V sample.
extern "C" __global__ void rgb_to_yuv420(const unsigned char* rgb, unsigned char* out, int H,
                                         int W, long long total_blocks) {
    long long stride = (long long)blockDim.x * gridDim.x;
    long long frame = (long long)H * W * 3 / 2;
    int bw = W / 2, bh = H / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total_blocks;
         i += stride) {
        int bx = (int)(i % bw);
        int by = (int)((i / bw) % bh);
        long long b = i / bw / bh;
        const unsigned char* src = rgb + b * (long long)H * W * 3;
        unsigned char* dst = out + b * frame;
        int sr = 0, sg = 0, sb = 0;
        for (int dy = 0; dy < 2; ++dy) {
            for (int dx = 0; dx < 2; ++dx) {
                int y = 2 * by + dy, x = 2 * bx + dx;
                const unsigned char* px = src + ((long long)y * W + x) * 3;
                int r = px[0], g = px[1], bl = px[2];
                sr += r;
                sg += g;
                sb += bl;
                dst[(long long)y * W + x] =
                    (unsigned char)(((66 * r + 129 * g + 25 * bl + 128) >> 8) + 16);
            }
        }
        int r = (sr + 2) >> 2, g = (sg + 2) >> 2, bl = (sb + 2) >> 2;
        long long ci = (long long)by * bw + bx;
        dst[(long long)H * W + ci] =
            (unsigned char)(((-38 * r - 74 * g + 112 * bl + 128) >> 8) + 128);
        dst[(long long)H * W + (long long)bh * bw + ci] =
            (unsigned char)(((112 * r - 94 * g - 18 * bl + 128) >> 8) + 128);
    }
}

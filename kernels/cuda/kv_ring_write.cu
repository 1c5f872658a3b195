// KV-cache window write with sink frames: the cache holds `sink` tokens that are never
// evicted followed by a ring of `ring` tokens. The token with global index g lands in slot
// g while g < sink, else in sink + (g - sink) % ring, so writing past the window evicts the
// oldest non-sink tokens without moving any data. k and v are written in one launch.
// cache_*: (B, sink + ring, row); new_*: (B, n_new, row); row = heads * head_dim.
template <typename T>
__device__ void kv_ring_write_impl(T* cache_k, T* cache_v, const T* new_k, const T* new_v,
                                   long long n_new, long long row, long long sink,
                                   long long ring, long long n_written, long long total) {
    long long cap = sink + ring;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += stride) {
        long long e = i % row;
        long long t = (i / row) % n_new;
        long long b = i / row / n_new;
        long long g = n_written + t;
        long long slot = g < sink ? g : sink + (g - sink) % ring;
        long long dst = (b * cap + slot) * row + e;
        cache_k[dst] = new_k[i];
        cache_v[dst] = new_v[i];
    }
}

#define WF_KV_ARGS(T)                                                                     \
    T *cache_k, T *cache_v, const T *new_k, const T *new_v, long long n_new, long long row, \
        long long sink, long long ring, long long n_written, long long total

extern "C" __global__ void kv_ring_write_f32(WF_KV_ARGS(float)) {
    kv_ring_write_impl(cache_k, cache_v, new_k, new_v, n_new, row, sink, ring, n_written,
                       total);
}

extern "C" __global__ void kv_ring_write_bf16(WF_KV_ARGS(wf_bf16)) {
    kv_ring_write_impl(cache_k, cache_v, new_k, new_v, n_new, row, sink, ring, n_written,
                       total);
}

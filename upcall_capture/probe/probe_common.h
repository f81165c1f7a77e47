/*
 * probe_common.h: what recv_upcall.c and dp_upcall.c share. The loader puts it in place of
 * the #include (loader.program_text), after the program's maps: count() adds to its
 * per-CPU `counters` array.
 */

/* min(len, cap) in a form the verifier can follow: the clamp is done in 64 bits on one
 * register (the empty asm keeps the compiler from splitting it into a select over a
 * zero-extended copy), so every copy provably stays inside the record. */
#define CLAMP(len, cap) ({ u64 __v = (len); asm volatile("" : "+r"(__v)); \
                           if (__v > (cap)) __v = (cap); __v; })

static __always_inline void count(u32 which)
{
    u64 *value = counters.lookup(&which);
    if (value)
        (*value)++;
}

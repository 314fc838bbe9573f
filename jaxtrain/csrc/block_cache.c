/* Keeps XLA:CPU's per-step temporary block mapped between steps (loaded with LD_PRELOAD).
 *
 * XLA:CPU allocates the whole temporary space of one execution as a single aligned block
 * (`posix_memalign`, 1.43 GB for the 35M training step) and frees it when the execution ends.
 * glibc serves a block that large with a fresh `mmap` and returns it with `munmap`, so every step
 * the kernel faults the block in again and zero-fills it page by page. This library interposes
 * `posix_memalign` and `free` (plus `realloc` and `malloc_usable_size`, so that every function
 * that may see one of its blocks knows it) and keeps blocks of at least MIN_BYTES in a small
 * table after they are freed: the next request of the same size gets the same, already faulted-in
 * pages. Everything else goes to glibc unchanged.
 *
 * Memory: a kept block stays resident while idle, so between steps the process holds what it held
 * at the step's peak; the peak itself does not grow. At most one block of each size is kept (a
 * block freed while another of its size exists is unmapped), and a request of a size that no
 * idle block has (another executable) unmaps the idle blocks first, so blocks of a workload that
 * is no longer running are not kept. When the next step's request comes in before the previous
 * step has freed its block (seen: by 0.1-8 ms; the runtime frees after it signals completion), it
 * waits for that block up to WAIT_NS instead of mapping a second one; it only waits for blocks
 * that have been freed before (a step's temporary), never for a long-lived buffer of that size.
 *
 * Pointers it does not own go to glibc (`__libc_free`, ...), so it must not be combined with
 * another preloaded allocator; jaxtrain/host_malloc.py adds it only to an empty LD_PRELOAD. Plain
 * C, no Python API, so that programs started from a process that has it in LD_PRELOAD load it
 * without error.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define MIN_BYTES ((size_t)64 << 20)
#define BLOCK_ALIGN ((size_t)2 << 20) /* one transparent huge page */
#define SLOTS 64
#define WAIT_NS 50000000L

extern void *__libc_malloc(size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);

typedef struct {
  char *base; /* read without the lock by free(); written under it */
  size_t size;
  int in_use;
  int recycled; /* freed at least once: a per-execution block, worth waiting for */
} slot_t;

static slot_t slots[SLOTS];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t released = PTHREAD_COND_INITIALIZER;
static size_t (*libc_usable_size)(void *);

static void lock_for_fork(void) { pthread_mutex_lock(&mu); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&mu); }

__attribute__((constructor)) static void init(void) {
  libc_usable_size = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
}

static int slot_of(const void *p) {
  if (!p || ((uintptr_t)p & (BLOCK_ALIGN - 1))) return -1; /* ours are 2 MiB aligned */
  for (int i = 0; i < SLOTS; i++)
    if (__atomic_load_n(&slots[i].base, __ATOMIC_ACQUIRE) == p) return i;
  return -1;
}

/* Index of a slot holding a block of `size` with in_use == `in_use` (and recycled, if asked). */
static int find(size_t size, int in_use, int recycled_only) {
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].base && slots[i].size == size && slots[i].in_use == in_use &&
        (!recycled_only || slots[i].recycled))
      return i;
  return -1;
}

/* A fresh 2 MiB-aligned anonymous mapping of `size` bytes (a multiple of BLOCK_ALIGN). */
static char *map_block(size_t size) {
  char *raw = mmap(NULL, size + BLOCK_ALIGN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *base = (char *)(((uintptr_t)raw + BLOCK_ALIGN - 1) & ~(uintptr_t)(BLOCK_ALIGN - 1));
  if (base > raw) munmap(raw, (size_t)(base - raw));
  size_t tail = (size_t)(raw + size + BLOCK_ALIGN - (base + size));
  if (tail) munmap(base + size, tail);
  madvise(base, size, MADV_HUGEPAGE);
  return base;
}

static void *take(size_t request) {
  size_t size = (request + BLOCK_ALIGN - 1) & ~(BLOCK_ALIGN - 1);
  pthread_mutex_lock(&mu);
  int i = find(size, 0, 0);
  if (i < 0 && find(size, 1, 1) >= 0) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_nsec += WAIT_NS;
    if (deadline.tv_nsec >= 1000000000L) {
      deadline.tv_sec += 1;
      deadline.tv_nsec -= 1000000000L;
    }
    while ((i = find(size, 0, 0)) < 0 && find(size, 1, 1) >= 0)
      if (pthread_cond_timedwait(&released, &mu, &deadline) == ETIMEDOUT) {
        i = find(size, 0, 0);
        break;
      }
  }
  if (i >= 0) {
    slots[i].in_use = 1;
    char *base = slots[i].base;
    pthread_mutex_unlock(&mu);
    return base;
  }
  int empty = -1;
  for (int j = 0; j < SLOTS; j++) {
    if (slots[j].base && !slots[j].in_use) { /* idle, of another size: drop it */
      char *base = slots[j].base;
      __atomic_store_n(&slots[j].base, NULL, __ATOMIC_RELEASE);
      munmap(base, slots[j].size);
    }
    if (!slots[j].base && empty < 0) empty = j;
  }
  char *base = empty >= 0 ? map_block(size) : NULL;
  if (base) {
    slots[empty].size = size;
    slots[empty].in_use = 1;
    slots[empty].recycled = 0;
    __atomic_store_n(&slots[empty].base, base, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&mu);
  return base; /* NULL: table full or mmap failed; the caller falls back to glibc */
}

/* Marks slot i idle, or unmaps it if another block of its size exists (in use or idle): one block
 * per size is kept, so two executions that overlapped once (the first two steps, before any
 * block was recycled) do not leave two resident blocks behind. */
static void release(int i) {
  pthread_mutex_lock(&mu);
  int twin = 0;
  for (int j = 0; j < SLOTS; j++)
    if (j != i && slots[j].base && slots[j].size == slots[i].size) twin = 1;
  if (twin) {
    char *base = slots[i].base;
    __atomic_store_n(&slots[i].base, NULL, __ATOMIC_RELEASE);
    munmap(base, slots[i].size);
  } else {
    slots[i].in_use = 0;
    slots[i].recycled = 1;
  }
  pthread_cond_broadcast(&released);
  pthread_mutex_unlock(&mu);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
  void *p = NULL;
  if (size >= MIN_BYTES && alignment <= BLOCK_ALIGN) p = take(size);
  if (!p) p = __libc_memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void free(void *p) {
  int i = slot_of(p);
  if (i >= 0)
    release(i);
  else
    __libc_free(p);
}

void *realloc(void *p, size_t size) {
  int i = slot_of(p);
  if (i < 0) return __libc_realloc(p, size);
  if (size == 0) {
    release(i);
    return NULL;
  }
  void *q = __libc_malloc(size);
  if (!q) return NULL; /* p stays valid, as realloc promises */
  memcpy(q, p, size < slots[i].size ? size : slots[i].size);
  release(i);
  return q;
}

size_t malloc_usable_size(void *p) {
  int i = slot_of(p);
  if (i >= 0) return slots[i].size;
  return p && libc_usable_size ? libc_usable_size(p) : 0;
}

// All-reduce and gather over shared memory, for the tensor-parallel ranks of one machine.
//
// gloo sends even a 4 KiB all-reduce through its TCP pairs and worker threads (about 2 ms
// a call on a 2-core VM, 25 calls a decode step); ranks that share a machine can instead
// write their part into their slot of a shared mapping and read everyone's. Each call:
// every rank copies (a chunk of) its tensor into its slot, publishes the call's sequence
// number, waits until every rank has published it, then reads all slots (the sum in rank
// order, so that every rank gets the same bits; or rank 0 takes the parts). Slots are
// double-buffered by the sequence number's parity: a rank can only reach call s + 2 once
// every rank has published s + 1, which each does after it finished reading call s.
//
// A wait that lasts past the timeout, or whose peer process has exited (its pidfd turns
// readable), raises instead of spinning forever.

#include <torch/extension.h>

#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>
#include <fcntl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int64_t kLineBytes = 64;  // one sequence number per cache line

struct ShmGroup {
  int64_t rank, size, slot_bytes;
  double timeout_seconds;
  std::vector<int> peer_pidfds;  // -1 for this rank
  uint8_t* base = nullptr;
  size_t mapped_bytes = 0;
  int64_t seq = 0;

  ShmGroup(const std::string& path, int64_t rank, int64_t size, int64_t slot_bytes,
           std::vector<int64_t> pidfds, double timeout_seconds)
      : rank(rank), size(size), slot_bytes(slot_bytes), timeout_seconds(timeout_seconds) {
    for (auto fd : pidfds) peer_pidfds.push_back(static_cast<int>(fd));
    mapped_bytes = size * kLineBytes + 2 * size * slot_bytes;
    int fd = open(path.c_str(), O_RDWR);
    if (fd < 0) throw std::runtime_error("cannot open shared memory " + path);
    void* p = mmap(nullptr, mapped_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) throw std::runtime_error("cannot map shared memory " + path);
    base = static_cast<uint8_t*>(p);
  }

  ~ShmGroup() {
    if (base) munmap(base, mapped_bytes);
  }

  std::atomic<int64_t>* published(int64_t r) {
    return reinterpret_cast<std::atomic<int64_t>*>(base + r * kLineBytes);
  }

  uint8_t* slot(int64_t phase, int64_t r) {
    return base + size * kLineBytes + (phase * size + r) * slot_bytes;
  }

  // Publish `bytes` bytes of `src` as this call's part, and wait for every rank's.
  int64_t exchange(const uint8_t* src, int64_t bytes) {
    ++seq;
    int64_t phase = seq & 1;
    std::memcpy(slot(phase, rank), src, bytes);
    published(rank)->store(seq, std::memory_order_release);
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                        std::chrono::duration<double>(timeout_seconds));
    for (int64_t r = 0; r < size; ++r) {
      uint64_t spins = 0;
      while (published(r)->load(std::memory_order_acquire) < seq) {
        if (++spins % 1024 == 0 || spins > 1024 * 4) check(r, deadline, spins);
      }
    }
    return phase;
  }

  void check(int64_t r, std::chrono::steady_clock::time_point deadline, uint64_t spins) {
    pollfd event{peer_pidfds[r], POLLIN, 0};
    if (peer_pidfds[r] >= 0 && poll(&event, 1, 0) > 0)
      throw std::runtime_error("tensor-parallel rank " + std::to_string(r) +
                               " exited during a collective");
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error("tensor-parallel rank " + std::to_string(r) +
                               " did not join a collective within the timeout");
    // Waiting more than a few microseconds: give the core away at every check, so that on a
    // machine with fewer free cores than ranks the peer we wait for can run on it.
    if (spins > 1024 * 4) sched_yield();
  }

  void all_reduce(torch::Tensor x) {
    TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "a contiguous CPU tensor");
    auto flat = x.view({-1});
    int64_t item = x.element_size();
    int64_t chunk = slot_bytes / item;
    for (int64_t start = 0; start < flat.numel(); start += chunk) {
      int64_t n = std::min(chunk, flat.numel() - start);
      auto part = flat.narrow(0, start, n);
      int64_t phase = exchange(static_cast<const uint8_t*>(part.data_ptr()), n * item);
      auto options = part.options();
      part.copy_(torch::from_blob(slot(phase, 0), {n}, options));
      for (int64_t r = 1; r < size; ++r)
        part.add_(torch::from_blob(slot(phase, r), {n}, options));
    }
  }

  // Every rank's x ([rows, cols]) side by side, [rows, size * cols], on rank 0; an empty
  // tensor elsewhere.
  torch::Tensor gather(torch::Tensor x) {
    TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() && x.dim() == 2,
                "a contiguous 2-d CPU tensor");
    auto flat = x.view({-1});
    int64_t item = x.element_size();
    int64_t chunk = slot_bytes / item;
    auto parts = rank == 0 ? torch::empty({size, flat.numel()}, x.options()) : torch::Tensor();
    for (int64_t start = 0; start < flat.numel(); start += chunk) {
      int64_t n = std::min(chunk, flat.numel() - start);
      auto part = flat.narrow(0, start, n);
      int64_t phase = exchange(static_cast<const uint8_t*>(part.data_ptr()), n * item);
      if (rank == 0) {
        for (int64_t r = 0; r < size; ++r)
          std::memcpy(static_cast<uint8_t*>(parts[r].data_ptr()) + start * item,
                      slot(phase, r), n * item);
      }
    }
    if (rank != 0) return torch::empty({0}, x.options());
    return parts.view({size, x.size(0), x.size(1)}).permute({1, 0, 2}).reshape(
        {x.size(0), size * x.size(1)});
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<ShmGroup>(m, "ShmGroup")
      .def(pybind11::init<const std::string&, int64_t, int64_t, int64_t, std::vector<int64_t>,
                          double>())
      .def("all_reduce", &ShmGroup::all_reduce, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("gather", &ShmGroup::gather, pybind11::call_guard<pybind11::gil_scoped_release>());
}

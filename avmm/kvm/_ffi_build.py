"""cffi build script (API mode) for the KVM binding.

Compiled at install time against the build machine's ``<linux/kvm.h>``: every struct
layout and ioctl number below is checked or filled in by the C compiler. Structs are
declared with ``...;`` so that only the fields we use are named and the compiler supplies
the offsets; ``#define NAME ...`` makes cffi take the real value from the header.

The anonymous structs inside ``struct kvm_run``'s exit union have no C name, so the
source part gives them one with ``__typeof__`` and exposes small accessors.
"""

from cffi import FFI

ffibuilder = FFI()

IOCTLS = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST",
    "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2", "KVM_IRQ_LINE",
    "KVM_IRQFD", "KVM_IOEVENTFD", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
    "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_GET_DIRTY_LOG",
    "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
    "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_SET_CPUID2",
    "KVM_GET_CPUID2", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_TRANSLATE",
    # the rest of a vCPU's state, for snapshots
    "KVM_GET_XSAVE", "KVM_GET_XSAVE2", "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS",
    "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_TSC_KHZ", "KVM_SET_TSC_KHZ",
]

CONSTANTS = [
    # exit reasons
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_DEBUG", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_SET_TPR",
    "KVM_EXIT_TPR_ACCESS", "KVM_EXIT_NMI", "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_IOAPIC_EOI",
    "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
    "KVM_INTERNAL_ERROR_EMULATION", "KVM_INTERNAL_ERROR_SIMUL_EX",
    "KVM_INTERNAL_ERROR_DELIVERY_EV",
    "KVM_SYSTEM_EVENT_SHUTDOWN", "KVM_SYSTEM_EVENT_RESET", "KVM_SYSTEM_EVENT_CRASH",
    # capabilities
    "KVM_CAP_IRQCHIP", "KVM_CAP_HLT", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_EXT_CPUID", "KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS", "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_PIT2", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD", "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_ADJUST_CLOCK",
    "KVM_CAP_XSAVE", "KVM_CAP_XSAVE2", "KVM_CAP_XCRS", "KVM_CAP_DEBUGREGS",
    "KVM_CAP_TSC_CONTROL", "KVM_CAP_GET_TSC_KHZ", "KVM_CAP_TSC_DEADLINE_TIMER",
    # flags
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_PIT_SPEAKER_DUMMY",
    "KVM_IRQFD_FLAG_DEASSIGN", "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO",
    "KVM_IOEVENTFD_FLAG_DEASSIGN", "KVM_VCPUEVENT_VALID_NMI_PENDING",
    "KVM_VCPUEVENT_VALID_SIPI_VECTOR", "KVM_VCPUEVENT_VALID_SHADOW",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_INIT_RECEIVED",
    "KVM_MP_STATE_HALTED", "KVM_MP_STATE_SIPI_RECEIVED",
    "KVM_VCPUEVENT_VALID_SMM", "KVM_VCPUEVENT_VALID_PAYLOAD",
    "KVM_VCPUEVENT_VALID_TRIPLE_FAULT",
    "KVM_CLOCK_TSC_STABLE", "KVM_CLOCK_REALTIME", "KVM_CLOCK_HOST_TSC",
    "KVM_IRQCHIP_PIC_MASTER", "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC",
    "KVM_IOAPIC_NUM_PINS", "KVM_MAX_XCRS", "KVM_PIT_FLAGS_HPET_LEGACY",
    "KVM_PIT_FLAGS_SPEAKER_DATA_ON",
]

CDEF = """
int ioctl(int fd, unsigned long request, ...);

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};

/* KVM_GET_DIRTY_LOG: the slot's bitmap (one bit per page, in u64 words) lands in a
   buffer of ours; the union's other member is padding. */
struct kvm_dirty_log { uint32_t slot; void *dirty_bitmap; ...; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};

typedef struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                 uint64_t data_offset; } avmm_exit_io;
typedef struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; }
    avmm_exit_mmio;
typedef struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; }
    avmm_exit_fail_entry;
typedef struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; }
    avmm_exit_internal;
typedef struct { uint32_t type; uint32_t ndata; ...; } avmm_exit_system_event;
typedef struct { uint64_t hardware_exit_reason; } avmm_exit_hw;

avmm_exit_io *avmm_run_io(struct kvm_run *run);
avmm_exit_mmio *avmm_run_mmio(struct kvm_run *run);
avmm_exit_fail_entry *avmm_run_fail_entry(struct kvm_run *run);
avmm_exit_internal *avmm_run_internal(struct kvm_run *run);
avmm_exit_system_event *avmm_run_system_event(struct kvm_run *run);
uint64_t *avmm_run_system_event_data(struct kvm_run *run);
avmm_exit_hw *avmm_run_hw(struct kvm_run *run);

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type; uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable; ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[...];
};

struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint16_t last_opcode;
    uint64_t last_ip; uint64_t last_dp; uint8_t xmm[16][16]; uint32_t mxcsr; ...;
};

struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };

struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };

struct kvm_lapic_state { char regs[...]; };

struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending;
             uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct { uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t exception_has_payload;
    uint64_t exception_payload;
    ...;
};
typedef struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending;
                 uint32_t error_code; } avmm_events_exception;
avmm_events_exception *avmm_events_exception_of(struct kvm_vcpu_events *events);

/* struct kvm_xsave ends in a flexible array (KVM_GET_XSAVE2 writes as many bytes as
   KVM_CAP_XSAVE2 says): buffers are allocated as bytes and cast. */
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; ...; };

struct kvm_pic_state {
    uint8_t last_irr; uint8_t irr; uint8_t imr; uint8_t isr; uint8_t priority_add;
    uint8_t irq_base; uint8_t read_reg_select; uint8_t poll; uint8_t special_mask;
    uint8_t init_state; uint8_t auto_eoi; uint8_t rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode; uint8_t init4; uint8_t elcr; uint8_t elcr_mask;
};
struct kvm_ioapic_state {
    uint64_t base_address; uint32_t ioregsel; uint32_t id; uint32_t irr; ...;
};
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pic_state *avmm_irqchip_pic(struct kvm_irqchip *chip);
struct kvm_ioapic_state *avmm_irqchip_ioapic(struct kvm_irqchip *chip);
uint64_t *avmm_ioapic_redirtbl(struct kvm_ioapic_state *ioapic);

struct kvm_pit_channel_state {
    uint32_t count; uint16_t latched_count; uint8_t count_latched; uint8_t status_latched;
    uint8_t status; uint8_t read_state; uint8_t write_state; uint8_t write_latch;
    uint8_t rw_mode; uint8_t mode; uint8_t bcd; uint8_t gate; int64_t count_load_time;
};
struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; uint32_t flags; ...; };

struct kvm_clock_data {
    uint64_t clock; uint32_t flags; uint64_t realtime; uint64_t host_tsc; ...;
};

struct kvm_mp_state { uint32_t mp_state; };

struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...;
};
struct kvm_translation {
    uint64_t linear_address; uint64_t physical_address;
    uint8_t valid; uint8_t writeable; uint8_t usermode; ...;
};

int avmm_install_kick_handler(void);
int avmm_kick_signal(void);

typedef struct { uint64_t address; uint32_t size; uint32_t count; uint64_t data_offset; }
    avmm_exit_info;
int avmm_vcpu_run(int fd, struct kvm_run *run, avmm_exit_info *info);
#define AVMM_RUN_OTHER ...
#define AVMM_RUN_IO_OUT ...
#define AVMM_RUN_IO_IN ...
#define AVMM_RUN_MMIO_WRITE ...
#define AVMM_RUN_MMIO_READ ...
#define AVMM_RUN_INTERRUPTED ...

typedef struct { uint32_t kind; uint32_t size; uint64_t address; } avmm_absorb_entry;
typedef struct {
    uint32_t count; uint32_t budget; uint64_t absorbed[6]; avmm_absorb_entry entries[16];
} avmm_absorb;
int avmm_vcpu_run_absorbing(int fd, struct kvm_run *run, avmm_exit_info *info,
                            avmm_absorb *absorb);
#define AVMM_ABSORB_ENTRIES ...

"""

for name in IOCTLS + CONSTANTS:
    CDEF += f"#define {name} ...\n"

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

typedef __typeof__(((struct kvm_run *)0)->io) avmm_exit_io;
typedef __typeof__(((struct kvm_run *)0)->mmio) avmm_exit_mmio;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) avmm_exit_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->internal) avmm_exit_internal;
typedef __typeof__(((struct kvm_run *)0)->system_event) avmm_exit_system_event;
typedef __typeof__(((struct kvm_run *)0)->hw) avmm_exit_hw;
typedef __typeof__(((struct kvm_vcpu_events *)0)->exception) avmm_events_exception;

static avmm_exit_io *avmm_run_io(struct kvm_run *run) { return &run->io; }
static avmm_exit_mmio *avmm_run_mmio(struct kvm_run *run) { return &run->mmio; }
static avmm_exit_fail_entry *avmm_run_fail_entry(struct kvm_run *run) { return &run->fail_entry; }
static avmm_exit_internal *avmm_run_internal(struct kvm_run *run) { return &run->internal; }
static avmm_exit_system_event *avmm_run_system_event(struct kvm_run *run) {
    return &run->system_event;
}
static uint64_t *avmm_run_system_event_data(struct kvm_run *run) {
    return run->system_event.data;
}
static avmm_exit_hw *avmm_run_hw(struct kvm_run *run) { return &run->hw; }
static avmm_events_exception *avmm_events_exception_of(struct kvm_vcpu_events *events) {
    return &events->exception;
}

/* The irqchip's chip union, and the IOAPIC's redirection table (an array of unions of
   a u64 and its bit fields), as plain types. */
static struct kvm_pic_state *avmm_irqchip_pic(struct kvm_irqchip *chip) {
    return &chip->chip.pic;
}
static struct kvm_ioapic_state *avmm_irqchip_ioapic(struct kvm_irqchip *chip) {
    return &chip->chip.ioapic;
}
_Static_assert(sizeof(((struct kvm_ioapic_state *)0)->redirtbl[0]) == sizeof(uint64_t),
               "an IOAPIC redirection entry is one u64");
static uint64_t *avmm_ioapic_redirtbl(struct kvm_ioapic_state *ioapic) {
    return &ioapic->redirtbl[0].bits;
}

/* KVM_RUN once, and the common exits decoded in C: from Python, one call and one
   struct unpack replace the ioctl call and half a dozen cdata field reads. Returns
   -errno if the ioctl failed, AVMM_RUN_OTHER for an exit the caller decodes from
   kvm_run itself, or the kind of access, with its fields in *info. */
#define AVMM_RUN_OTHER 0
#define AVMM_RUN_IO_OUT 1
#define AVMM_RUN_IO_IN 2
#define AVMM_RUN_MMIO_WRITE 3
#define AVMM_RUN_MMIO_READ 4
#define AVMM_RUN_INTERRUPTED 5

typedef struct { uint64_t address; uint32_t size; uint32_t count; uint64_t data_offset; }
    avmm_exit_info;

static int avmm_vcpu_run(int fd, struct kvm_run *run, avmm_exit_info *info) {
    if (ioctl(fd, KVM_RUN, 0UL) < 0)
        return -errno;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        info->address = run->io.port;
        info->size = run->io.size;
        info->count = run->io.count;
        info->data_offset = run->io.data_offset;
        return run->io.direction == KVM_EXIT_IO_OUT ? AVMM_RUN_IO_OUT : AVMM_RUN_IO_IN;
    case KVM_EXIT_MMIO:
        info->address = run->mmio.phys_addr;
        /* At most the 8 bytes of mmio.data, whatever the kernel wrote in len. */
        info->size = run->mmio.len <= 8 ? run->mmio.len : 8;
        info->count = 1;
        info->data_offset = 0;
        return run->mmio.is_write ? AVMM_RUN_MMIO_WRITE : AVMM_RUN_MMIO_READ;
    case KVM_EXIT_INTR:
        return AVMM_RUN_INTERRUPTED;
    default:
        return AVMM_RUN_OTHER;
    }
}

/* The C fast path of the vCPU loop: accesses that the VMM answers with a constant
   (writes dropped, reads of all-ones: an address no device claims) never reach Python.
   The caller lists them in absorb->entries (kind, address, size; single accesses only,
   not string I/O); avmm_vcpu_run_absorbing() re-enters KVM_RUN after each of them
   itself, counting them by kind in absorb->absorbed[kind] (and all of them in
   absorb->absorbed[0]). It returns like avmm_vcpu_run() for any other exit (a kick
   included: KVM_RUN fails with EINTR), or AVMM_RUN_INTERRUPTED once it has absorbed
   `budget` exits in one call, so that the caller sees its counters and requests
   regularly. Another thread may set count to 0 at any time to stop the absorbing (the
   address map changed): the table is read through a volatile pointer on every exit. */
#define AVMM_ABSORB_ENTRIES 16

typedef struct { uint32_t kind; uint32_t size; uint64_t address; } avmm_absorb_entry;
typedef struct {
    uint32_t count; uint32_t budget; uint64_t absorbed[6];
    avmm_absorb_entry entries[AVMM_ABSORB_ENTRIES];
} avmm_absorb;

static int avmm_vcpu_run_absorbing(int fd, struct kvm_run *run, avmm_exit_info *info,
                                   avmm_absorb *absorb) {
    volatile avmm_absorb *table = absorb;
    uint32_t left = table->budget;
    for (;;) {
        int kind = avmm_vcpu_run(fd, run, info);
        if (kind < AVMM_RUN_IO_OUT || kind > AVMM_RUN_MMIO_READ || info->count != 1)
            return kind;
        uint32_t count = table->count;
        uint32_t i;
        if (count > AVMM_ABSORB_ENTRIES)
            count = AVMM_ABSORB_ENTRIES;
        for (i = 0; i < count; i++) {
            if (table->entries[i].kind == (uint32_t)kind
                    && table->entries[i].address == info->address
                    && table->entries[i].size == info->size)
                break;
        }
        if (i == count)
            return kind;
        if (kind == AVMM_RUN_IO_IN) {
            /* KVM put the data area inside the mapped kvm_run; size is 1, 2 or 4. */
            memset((char *)run + info->data_offset, 0xff, info->size);
        } else if (kind == AVMM_RUN_MMIO_READ) {
            memset(run->mmio.data, 0xff, info->size);
        }
        table->absorbed[kind]++;
        table->absorbed[0]++;  /* the total, so that the caller can check one field */
        if (left <= 1)
            return AVMM_RUN_INTERRUPTED;
        left--;
    }
}

/* The signal that kicks a vCPU thread out of KVM_RUN. A real-time signal, as other
   VMMs use, so that it does not collide with SIGUSR1/2 of an embedding program. */
static int avmm_kick_signal(void) { return SIGRTMIN + 1; }

static void avmm_kick_noop(int signo) { (void)signo; }

/* Installed at C level, not through Python's signal module: Python would run a handler
   on the main thread and poke trio's wakeup fd for every kick. Without SA_RESTART the
   interrupted KVM_RUN returns EINTR, which is all a kick needs. */
static int avmm_install_kick_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = avmm_kick_noop;
    sigemptyset(&sa.sa_mask);
    return sigaction(avmm_kick_signal(), &sa, NULL);
}
"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source("avmm.kvm._kvm_ffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)

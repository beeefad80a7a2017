/*
 * Fixed numbers shared by the assembly and the C side of the test guest.
 * This header must stay valid for both the assembler and the compiler.
 */
#ifndef AVMM_GUEST_LAYOUT_H
#define AVMM_GUEST_LAYOUT_H

/* Where the image is linked and loaded (physical == virtual). */
#define GUEST_LOAD_ADDR     0x100000
/* The host-readable mailbox page; see README.md. */
#define MAILBOX_ADDR        0x200000
#define MAILBOX_MAGIC       0x584f424c49414d41 /* "AMAILBOX" little-endian */

/* GDT selectors. The order is fixed: entry code and the README depend on it. */
#define SEL_KERNEL_CODE     0x08
#define SEL_KERNEL_DATA     0x10
#define SEL_USER_DATA       0x1b /* 0x18 | RPL 3 */
#define SEL_USER_CODE       0x23 /* 0x20 | RPL 3 */
#define SEL_TSS             0x28

/* How the guest was entered; recorded by the entry code for main.c. */
#define BOOT_KIND_LINUX64   0 /* 64-bit ELF entry, RSI = struct boot_params */
#define BOOT_KIND_PVH       1 /* PVH 32-bit entry, EBX = struct hvm_start_info */

/* Boot protocol offsets the guest reads. */
#define BOOT_PARAMS_EXT_CMD_LINE_PTR 0x0c8
#define BOOT_PARAMS_CMD_LINE_PTR     0x228
#define HVM_START_MAGIC              0x336ec578
#define HVM_START_CMDLINE_PADDR      24

/* RFLAGS for ring 3: IOPL=3, reserved bit 1 set, interrupts off. */
#define USER_RFLAGS         0x3002

/* Number of exception vectors with handlers in the IDT (0..31). */
#define IDT_VECTORS         32
/* Vectors whose gates point into ring0.S instead of the generic stubs:
 * #BP (breakpoint hook) and #UD (also the ring-0 call). */
#define BREAKPOINT_VECTOR   3
#define INVALID_OPCODE_VECTOR 6

/* Exit status codes (see exit.c and README.md). */
#define EXIT_OK             0
#define EXIT_FAILURE        1
#define EXIT_UNKNOWN_SCENARIO 2
#define EXIT_EXCEPTION      3

/* Ports. */
#define PORT_COM1           0x3f8
#define PORT_I8042_COMMAND  0x64
#define PORT_DEBUG_EXIT     0x501

#endif

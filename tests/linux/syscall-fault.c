/*
 * avmm-syscall-fault: what a guest process gets by jumping to the kernel's system call
 * entry point itself, with registers of its choosing (the minimal kernel's patch in
 * examples/linux/patches/ runs a user-mode fault there as a system call when
 * avmm.pvm_syscall_fault=1 is on the command line).
 *
 * Usage: avmm-syscall-fault ENTRY      (ENTRY: entry_SYSCALL_64's address in hex)
 *
 * Built static and without libc (scripts/initramfs-lib.sh) so that it runs in any
 * initramfs. Each case runs in a child process; the program only reports, the tests
 * (tests/linux/) judge. Lines, in this order per case:
 *   avmm-linux: syscall-fault CASE returned ret=N flags=0xHEX    child, if it came back
 *   avmm-linux: syscall-fault CASE outb succeeded                child, if `outb` worked
 *   avmm-linux: syscall-fault CASE pid=P exit=N | signal=N       parent: how the child ended
 * Cases:
 *   ordinary    an ordinary `syscall`: getpid(), exit status = its result & 0x7f.
 *   genuine     RAX = getpid, RCX just past a real `syscall` instruction, R11 = IOPL 3,
 *               NT, AC, DF with IF clear; jump to ENTRY. If it comes back: the flags it
 *               came back with (before it tidies them up), then `outb` to port 0x80.
 *   not-syscall the same with RCX just past two bytes that are not a `syscall`.
 * Exit status: 0 when every case ran (whatever its outcome), 1 on a usage or fork error.
 */

#define SYS_write 1
#define SYS_getpid 39
#define SYS_fork 57
#define SYS_exit 60
#define SYS_wait4 61

/* R11 as the jump passes it: IOPL 3, NT, AC, DF, bit 1; IF, TF clear. */
#define HOSTILE_FLAGS 0x47402UL

static long syscall3(long number, long a, long b, long c)
{
	long ret;

	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(number), "D"(a), "S"(b), "d"(c)
		     : "rcx", "r11", "memory");
	return ret;
}

static long syscall4(long number, long a, long b, long c, long d)
{
	register long r10 asm("r10") = d;
	long ret;

	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(number), "D"(a), "S"(b), "d"(c), "r"(r10)
		     : "rcx", "r11", "memory");
	return ret;
}

static __attribute__((noreturn)) void exit_now(int status)
{
	for (;;)
		syscall3(SYS_exit, status, 0, 0);
}

/* A line builder: text and numbers appended into one buffer, written with one write(). */
struct line {
	char text[160];
	unsigned long length;
};

static void put(struct line *line, const char *text)
{
	while (*text && line->length < sizeof(line->text) - 1)
		line->text[line->length++] = *text++;
}

static void put_number(struct line *line, unsigned long value, unsigned base)
{
	char digits[24];
	int count = 0;

	do {
		digits[count++] = "0123456789abcdef"[value % base];
		value /= base;
	} while (value);
	while (count && line->length < sizeof(line->text) - 1)
		line->text[line->length++] = digits[--count];
}

static void emit(struct line *line)
{
	line->text[line->length++] = '\n';
	syscall3(SYS_write, 1, (long)line->text, (long)line->length);
}

static void start(struct line *line, const char *name)
{
	line->length = 0;
	put(line, "avmm-linux: syscall-fault ");
	put(line, name);
}

static int parse_hex(const char *text, unsigned long *value)
{
	int digits = 0;

	if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X'))
		text += 2;
	for (*value = 0; *text; text++, digits++) {
		char c = *text;
		unsigned nibble;

		if (c >= '0' && c <= '9')
			nibble = c - '0';
		else if (c >= 'a' && c <= 'f')
			nibble = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			nibble = c - 'A' + 10;
		else
			return -1;
		*value = *value << 4 | nibble;
	}
	return digits > 0 && digits <= 16 ? 0 : -1;
}

/*
 * Jump to ENTRY with RAX = getpid, R11 = HOSTILE_FLAGS and RCX just past a `syscall`
 * instruction (genuine) or just past two `nop`s. Returns only if the kernel sent the
 * process back to RCX: the flags it arrived with, and RAX.
 */
static long jump_to_entry(unsigned long entry, int genuine, unsigned long *flags)
{
	long rax = SYS_getpid;

	asm volatile(
		"test %[genuine], %[genuine]\n\t"
		"jz 3f\n\t"
		"lea 1f(%%rip), %%rcx\n\t"
		"jmp 4f\n"
		"3:\n\t"
		"lea 2f(%%rip), %%rcx\n"
		"4:\n\t"
		"mov %[hostile], %%r11\n\t"
		"jmp *%[entry]\n\t"
		"syscall\n"			/* never run: 0f 05 just before 1: */
		"1:\n\t"
		"jmp 5f\n\t"
		"nop\n\t"
		"nop\n"				/* 90 90 just before 2: */
		"2:\n"
		"5:\n\t"
		/* The flags as they came back; then ones C code can run with (ring 3's popf
		 * changes neither IOPL nor, below IOPL 3, IF). */
		"pushfq\n\t"
		"pop %[flags]\n\t"
		"push $0x202\n\t"
		"popfq\n\t"
		: "+a"(rax), [flags] "=r"(*flags)
		: [entry] "r"(entry), [genuine] "r"((long)genuine), [hostile] "r"(HOSTILE_FLAGS)
		: "rcx", "r11", "memory", "cc");
	return rax;
}

static void child(const char *name, unsigned long entry)
{
	struct line line;
	unsigned long flags = 0;
	long ret;

	if (name[0] == 'o') /* ordinary */
		exit_now((int)(syscall3(SYS_getpid, 0, 0, 0) & 0x7f));
	ret = jump_to_entry(entry, name[0] == 'g', &flags);
	start(&line, name);
	put(&line, " returned ret=");
	put_number(&line, (unsigned long)ret, 10);
	put(&line, " flags=0x");
	put_number(&line, flags, 16);
	emit(&line);
	/* Allowed only with IOPL 3 (the process has no I/O bitmap): else #GP, SIGSEGV. */
	asm volatile("outb %%al, $0x80" : : "a"(0) : "memory");
	start(&line, name);
	put(&line, " outb succeeded");
	emit(&line);
	exit_now(0);
}

static int run_case(const char *name, unsigned long entry)
{
	struct line line;
	int status = 0;
	long pid = syscall3(SYS_fork, 0, 0, 0);

	if (pid == 0)
		child(name, entry);
	start(&line, name);
	if (pid < 0 || syscall4(SYS_wait4, pid, (long)&status, 0, 0) != pid) {
		put(&line, " FAILED fork or wait4");
		emit(&line);
		return 1;
	}
	put(&line, " pid=");
	put_number(&line, (unsigned long)pid, 10);
	if ((status & 0x7f) == 0) {
		put(&line, " exit=");
		put_number(&line, (status >> 8) & 0xff, 10);
	} else {
		put(&line, " signal=");
		put_number(&line, status & 0x7f, 10);
	}
	emit(&line);
	return 0;
}

int main(int argc, char **argv)
{
	static const char *const cases[] = {"ordinary", "genuine", "not-syscall"};
	unsigned long entry;
	struct line line;
	int failures = 0;
	unsigned i;

	if (argc != 2 || parse_hex(argv[1], &entry) != 0) {
		start(&line, "FAILED usage: avmm-syscall-fault ENTRY-HEX");
		emit(&line);
		return 1;
	}
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		failures += run_case(cases[i], entry);
	return failures ? 1 : 0;
}

/* No libc: the stack holds argc, then argv; align it and call main. */
asm(".globl _start\n"
    "_start:\n\t"
    "xor %ebp, %ebp\n\t"
    "mov (%rsp), %rdi\n\t"
    "lea 8(%rsp), %rsi\n\t"
    "and $-16, %rsp\n\t"
    "call main\n\t"
    "mov %eax, %edi\n\t"
    "mov $60, %eax\n\t"
    "syscall\n\t"
    "hlt\n");

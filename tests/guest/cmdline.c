#include "cmdline.h"

#include "guest.h"

static char buffer[CMDLINE_MAX];

void cmdline_load(uint64_t paddr)
{
    size_t n = 0;

    /* Ring 3 may read it: the page tables map all of the low 4 GiB as user. */
    if (paddr != 0 && paddr < (1ULL << 32)) {
        const volatile char *src = (const volatile char *)(uintptr_t)paddr;
        while (n < CMDLINE_MAX - 1 && src[n] != '\0') {
            buffer[n] = src[n];
            n++;
        }
    }
    buffer[n] = '\0';
}

const char *cmdline(void)
{
    return buffer;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Walk the words; for each word whose text before '=' (or the whole word)
 * equals key, remember it. The last one wins, as on Linux. */
static bool find_last(const char *key, const char **value, size_t *len, bool *has_value)
{
    size_t key_len = strlen(key);
    const char *p = buffer;
    bool found = false;

    while (*p) {
        while (is_space(*p))
            p++;
        const char *word = p;
        while (*p && !is_space(*p))
            p++;
        size_t word_len = (size_t)(p - word);
        if (word_len < key_len || memcmp(word, key, key_len) != 0)
            continue;
        if (word_len == key_len) {
            found = true;
            *has_value = false;
            *value = word + word_len;
            *len = 0;
        } else if (word[key_len] == '=') {
            found = true;
            *has_value = true;
            *value = word + key_len + 1;
            *len = word_len - key_len - 1;
        }
    }
    return found;
}

bool cmdline_get(const char *key, const char **value, size_t *len)
{
    bool has_value;
    return find_last(key, value, len, &has_value) && has_value;
}

bool cmdline_has(const char *key)
{
    const char *value;
    size_t len;
    bool has_value;
    return find_last(key, &value, &len, &has_value);
}

uint64_t cmdline_get_u64(const char *key, uint64_t fallback)
{
    const char *value;
    size_t len;
    uint64_t result;

    if (!cmdline_get(key, &value, &len))
        return fallback;
    if (!parse_u64(value, len, &result))
        guest_panic("%s: not a number", key);
    return result;
}

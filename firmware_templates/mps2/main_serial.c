/* EdgeOps serial harness for QEMU's mps2-an385 / mps2-an386: the model behind UART 0.
 *
 * The board answers frames on CMSDK APB UART 0 (uart.h), the framing of the host's
 * device_agent/runtime/_serial.py (all integers little-endian):
 *
 *     "EO" | kind (1) | seq (uint16) | n (uint32) | payload (n bytes) | CRC-32 (uint32)
 *
 * the CRC-32 being zlib's over kind, seq, n and payload. Each request (kind 'Q') is answered
 * with the same seq:
 *
 * - a payload of the input tensor as stored (EDGEOPS_MODEL_INPUT_SIZE int8 values, or
 *   float32 for a model with a float input) runs the model: kind 'R', payload uint32 cycles
 *   followed by the output tensor as stored (int8, or float32 for a float output). The cycles
 *   are the ticks of the 25 MHz CMSDK APB timer 0 across the inference (with the float
 *   conversions, if any) times 40: under `qemu-system-arm -icount shift=0` one guest
 *   instruction advances the virtual clock by 1 ns, so this is the guest instructions the
 *   inference took, to within one tick (40 instructions);
 * - an empty payload asks what the board runs: kind 'I', payload one line of JSON with the
 *   build id (EDGEOPS_BUILD_ID, passed with -D by the build: a digest of the library and
 *   harness sources), the target, the input and output sizes in values and bytes, the
 *   arena bytes, whether input and output are float32, and the requests and errors since
 *   boot (there is no non-volatile memory for a boot counter);
 * - anything else gets kind 'E' with a UTF-8 message: a payload of the wrong length, a bad
 *   CRC, a frame that is not a request, a frame longer than MAX_PAYLOAD, an invoke that
 *   fails.
 *
 * Bytes before a magic are skipped. Once a frame has started, a gap of more than one second
 * of virtual time between two of its bytes abandons it, so a truncated frame cannot swallow
 * the next one. A one-line boot banner precedes the first frame; nothing else but frames is
 * written. While waiting for a request the core sleeps in WFI (uart.h). */
#include <stdint.h>

#include "edgeops_model.h"
#include "uart.h"

#ifndef EDGEOPS_BUILD_ID
#define EDGEOPS_BUILD_ID "unknown"
#endif
#ifndef EDGEOPS_TARGET
#define EDGEOPS_TARGET "mps2"
#endif

/* CMSDK APB timer 0: a 32-bit down-counter clocked at the 25 MHz system clock. */
#define EO_TIMER0_BASE 0x40000000u
#define EO_TIMER_CTRL (*(volatile uint32_t *)(EO_TIMER0_BASE + 0x00u))
#define EO_TIMER_VALUE (*(volatile uint32_t *)(EO_TIMER0_BASE + 0x04u))
#define EO_TIMER_RELOAD (*(volatile uint32_t *)(EO_TIMER0_BASE + 0x08u))
#define EO_INSTRUCTIONS_PER_TICK 40u
#define EO_BYTE_TIMEOUT_TICKS 25000000u /* one second of the 25 MHz clock */

#define EO_KIND_REQUEST 0x51u /* 'Q' */
#define EO_KIND_RESULT 0x52u  /* 'R' */
#define EO_KIND_ERROR 0x45u   /* 'E' */
#define EO_KIND_INFO 0x49u    /* 'I' */
#define EO_MAX_PAYLOAD 0x100000u

#ifdef EDGEOPS_MODEL_FLOAT_INPUT
#define EO_INPUT_BYTES (EDGEOPS_MODEL_INPUT_SIZE * 4u)
#define EO_FLOAT_INPUT "true"
#define EO_INPUT_TYPE "float32"
#else
#define EO_INPUT_BYTES (EDGEOPS_MODEL_INPUT_SIZE * 1u)
#define EO_FLOAT_INPUT "false"
#define EO_INPUT_TYPE "int8"
#endif
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
#define EO_OUTPUT_BYTES (EDGEOPS_MODEL_OUTPUT_SIZE * 4u)
#define EO_FLOAT_OUTPUT "true"
#else
#define EO_OUTPUT_BYTES (EDGEOPS_MODEL_OUTPUT_SIZE * 1u)
#define EO_FLOAT_OUTPUT "false"
#endif

typedef union {
    uint8_t bytes[EO_INPUT_BYTES];
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
    float values[EDGEOPS_MODEL_INPUT_SIZE];
#else
    int8_t values[EDGEOPS_MODEL_INPUT_SIZE];
#endif
} eo_input_buffer;

typedef union {
    uint8_t bytes[EO_OUTPUT_BYTES];
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
    float values[EDGEOPS_MODEL_OUTPUT_SIZE];
#else
    int8_t values[EDGEOPS_MODEL_OUTPUT_SIZE];
#endif
} eo_output_buffer;

static eo_input_buffer eo_input;
static eo_output_buffer eo_output;
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
static int8_t eo_input_q[EDGEOPS_MODEL_INPUT_SIZE];
#endif
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
static int8_t eo_output_q[EDGEOPS_MODEL_OUTPUT_SIZE];
#endif
static uint32_t eo_requests;
static uint32_t eo_errors;

static void eo_timer_start(void) {
    EO_TIMER_CTRL = 0u;
    EO_TIMER_RELOAD = 0xffffffffu;
    EO_TIMER_VALUE = 0xffffffffu;
    EO_TIMER_CTRL = 1u;
}

/* zlib's CRC-32 (reflected polynomial 0xEDB88320), bitwise: no table in flash. */
static uint32_t eo_crc_update(uint32_t crc, uint8_t byte) {
    uint32_t bit;
    crc ^= byte;
    for (bit = 0u; bit < 8u; ++bit) {
        crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc;
}

/* ---- receiving ---- */

/* The next byte, sleeping until one comes (between frames). */
static uint8_t eo_get_idle(void) {
    while (!eo_uart_ready()) {
        eo_uart_sleep();
    }
    return eo_uart_take();
}

/* The next byte of a started frame; 0 if none came within EO_BYTE_TIMEOUT_TICKS. */
static int eo_get_timed(uint8_t *byte) {
    uint32_t start = EO_TIMER_VALUE;
    while (!eo_uart_ready()) {
        if (start - EO_TIMER_VALUE > EO_BYTE_TIMEOUT_TICKS) {
            return 0;
        }
    }
    *byte = eo_uart_take();
    return 1;
}

/* ---- sending ---- */

static uint32_t eo_tx_crc;

static void eo_send_byte(uint8_t byte) {
    eo_tx_crc = eo_crc_update(eo_tx_crc, byte);
    eo_uart_put(byte);
}

static void eo_send_u16(uint16_t value) {
    eo_send_byte((uint8_t)(value & 0xFFu));
    eo_send_byte((uint8_t)(value >> 8));
}

static void eo_send_u32(uint32_t value) {
    uint32_t shift;
    for (shift = 0u; shift < 32u; shift += 8u) {
        eo_send_byte((uint8_t)((value >> shift) & 0xFFu));
    }
}

static void eo_send_bytes(const uint8_t *data, uint32_t size) {
    uint32_t i;
    for (i = 0u; i < size; ++i) {
        eo_send_byte(data[i]);
    }
}

static void eo_frame_begin(uint8_t kind, uint16_t seq, uint32_t size) {
    eo_uart_put((uint8_t)'E');
    eo_uart_put((uint8_t)'O');
    eo_tx_crc = 0xFFFFFFFFu;
    eo_send_byte(kind);
    eo_send_u16(seq);
    eo_send_u32(size);
}

static void eo_frame_end(void) {
    uint32_t crc = ~eo_tx_crc;
    uint32_t shift;
    for (shift = 0u; shift < 32u; shift += 8u) {
        eo_uart_put((uint8_t)((crc >> shift) & 0xFFu));
    }
}

/* ---- text ---- */

typedef struct {
    char text[512]; /* the info JSON is about 320 bytes with 10-character target names */
    uint32_t length;
} eo_text;

static void eo_text_add(eo_text *out, const char *text) {
    while (*text != '\0' && out->length < sizeof out->text) {
        out->text[out->length++] = *text++;
    }
}

static void eo_text_number(eo_text *out, uint32_t value) {
    char digits[10];
    uint32_t n = 0u;
    do {
        digits[n++] = (char)('0' + (char)(value % 10u));
        value /= 10u;
    } while (value != 0u);
    while (n > 0u && out->length < sizeof out->text) {
        out->text[out->length++] = digits[--n];
    }
}

static void eo_send_text(uint8_t kind, uint16_t seq, const eo_text *text) {
    eo_frame_begin(kind, seq, text->length);
    eo_send_bytes((const uint8_t *)text->text, text->length);
    eo_frame_end();
}

/* An 'E' frame: message, then (when number_label is not NULL) number_label, the number and
 * tail. */
static void eo_send_error(uint16_t seq, const char *message, const char *number_label,
                          uint32_t number, const char *tail) {
    eo_text text;
    text.length = 0u;
    eo_text_add(&text, message);
    if (number_label != 0) {
        eo_text_add(&text, number_label);
        eo_text_number(&text, number);
        eo_text_add(&text, tail);
    }
    ++eo_errors;
    eo_send_text(EO_KIND_ERROR, seq, &text);
}

static void eo_send_info(uint16_t seq) {
    eo_text text;
    text.length = 0u;
    eo_text_add(&text, "{\"harness\":\"edgeops-serial\",\"build_id\":\"" EDGEOPS_BUILD_ID
                       "\",\"target\":\"" EDGEOPS_TARGET "\",\"input_size\":");
    eo_text_number(&text, EDGEOPS_MODEL_INPUT_SIZE);
    eo_text_add(&text, ",\"output_size\":");
    eo_text_number(&text, EDGEOPS_MODEL_OUTPUT_SIZE);
    eo_text_add(&text, ",\"input_bytes\":");
    eo_text_number(&text, EO_INPUT_BYTES);
    eo_text_add(&text, ",\"output_bytes\":");
    eo_text_number(&text, EO_OUTPUT_BYTES);
    eo_text_add(&text, ",\"arena_bytes\":");
    eo_text_number(&text, EDGEOPS_MODEL_ARENA_SIZE);
    eo_text_add(&text, ",\"float_input\":" EO_FLOAT_INPUT ",\"float_output\":" EO_FLOAT_OUTPUT
                       ",\"cycles\":\"instructions\",\"requests\":");
    eo_text_number(&text, eo_requests);
    eo_text_add(&text, ",\"errors\":");
    eo_text_number(&text, eo_errors);
    eo_text_add(&text, "}");
    eo_send_text(EO_KIND_INFO, seq, &text);
}

/* ---- the model ---- */

static void eo_run(uint16_t seq) {
    uint32_t before;
    uint32_t ticks;
    uint32_t cycles;
    int status;
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
    int8_t *const input_q = eo_input_q;
#else
    int8_t *const input_q = eo_input.values;
#endif
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
    int8_t *const output_q = eo_output_q;
#else
    int8_t *const output_q = eo_output.values;
#endif
    before = EO_TIMER_VALUE;
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
    edgeops_model_quantize_input(eo_input.values, input_q);
#endif
    status = edgeops_model_invoke(input_q, output_q);
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
    edgeops_model_dequantize_output(output_q, eo_output.values);
#endif
    ticks = before - EO_TIMER_VALUE;
    if (status != 0) {
        if (status < 0) {
            eo_send_error(seq, "edgeops_model_invoke failed", " with status -",
                          0u - (uint32_t)status, "");
        } else {
            eo_send_error(seq, "edgeops_model_invoke failed", " with status ", (uint32_t)status,
                          "");
        }
        return;
    }
    cycles = ticks > 0xFFFFFFFFu / EO_INSTRUCTIONS_PER_TICK ? 0xFFFFFFFFu
                                                              : ticks * EO_INSTRUCTIONS_PER_TICK;
    eo_frame_begin(EO_KIND_RESULT, seq, 4u + EO_OUTPUT_BYTES);
    eo_send_u32(cycles);
    eo_send_bytes(eo_output.bytes, EO_OUTPUT_BYTES);
    eo_frame_end();
}

/* Reads one frame after its magic and answers it; returns at once if the frame breaks off. */
static void eo_serve_frame(void) {
    uint8_t header[7];
    uint8_t byte;
    uint32_t crc = 0xFFFFFFFFu;
    uint32_t received = 0u;
    uint32_t length;
    uint32_t i;
    uint16_t seq;
    for (i = 0u; i < sizeof header; ++i) {
        if (!eo_get_timed(&header[i])) {
            return;
        }
        crc = eo_crc_update(crc, header[i]);
    }
    seq = (uint16_t)(header[1] | (uint16_t)(header[2] << 8));
    length = (uint32_t)header[3] | ((uint32_t)header[4] << 8) | ((uint32_t)header[5] << 16) |
             ((uint32_t)header[6] << 24);
    if (length > EO_MAX_PAYLOAD) {
        eo_send_error(seq, "frame too long:", " length ", length,
                      " exceeds the limit of 1048576 bytes");
        return;
    }
    for (i = 0u; i < length; ++i) {
        if (!eo_get_timed(&byte)) {
            return;
        }
        crc = eo_crc_update(crc, byte);
        if (i < EO_INPUT_BYTES) {
            eo_input.bytes[i] = byte;
        }
    }
    for (i = 0u; i < 4u; ++i) {
        if (!eo_get_timed(&byte)) {
            return;
        }
        received |= (uint32_t)byte << (8u * i);
    }
    if (received != ~crc) {
        eo_send_error(seq, "frame fails its CRC check", 0, 0u, "");
        return;
    }
    if (header[0] != EO_KIND_REQUEST) {
        eo_send_error(seq, "not a request:", " frame kind ", header[0],
                      " (a request is 81, 'Q')");
        return;
    }
    ++eo_requests;
    if (length == 0u) {
        eo_send_info(seq);
    } else if (length != EO_INPUT_BYTES) {
        eo_text text;
        text.length = 0u;
        eo_text_add(&text, "wrong input length: the request holds ");
        eo_text_number(&text, length);
        eo_text_add(&text, " bytes, the model takes ");
        eo_text_number(&text, EO_INPUT_BYTES);
        eo_text_add(&text, " (");
        eo_text_number(&text, EDGEOPS_MODEL_INPUT_SIZE);
        eo_text_add(&text, " " EO_INPUT_TYPE " values)");
        ++eo_errors;
        eo_send_text(EO_KIND_ERROR, seq, &text);
    } else {
        eo_run(seq);
    }
}

int main(void) {
    eo_text banner;
    uint32_t i;
    edgeops_model_init();
    eo_timer_start();
    eo_uart_init();
    banner.length = 0u;
    eo_text_add(&banner, "edgeops serial harness, build " EDGEOPS_BUILD_ID "\r\n");
    for (i = 0u; i < banner.length; ++i) {
        eo_uart_put((uint8_t)banner.text[i]);
    }
    for (;;) {
        if (eo_get_idle() != (uint8_t)'E') {
            continue;
        }
        /* a magic may start at the byte after a lone 'E' */
        for (;;) {
            uint8_t next;
            if (!eo_get_timed(&next)) {
                break;
            }
            if (next == (uint8_t)'O') {
                eo_serve_frame();
                break;
            }
            if (next != (uint8_t)'E') {
                break;
            }
        }
    }
}

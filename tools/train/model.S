/* The built-in default model of mtp-gen (issue 8): tools/train/default-q8_0.gguf, trained by
 * tools/train/train_mtp.py (see tools/train/README.md), embedded in the binary.  mtp.c declares
 * these symbols weak, so a build without this file still links (it then needs -m). */
        .section .rodata
        .balign 64
        .globl  mtp_default_model
mtp_default_model:
        .incbin "tools/train/default-q8_0.gguf"
mtp_default_model_end:
        .balign 8
        .globl  mtp_default_model_size
mtp_default_model_size:
        .quad   mtp_default_model_end - mtp_default_model
        .section .note.GNU-stack,"",%progbits

#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vqclip_fuzz::preprocessor_config(data));

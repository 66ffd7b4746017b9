//! OpenAI CLIP as Hugging Face transformers implements it (`models/clip/modeling_clip.py`):
//! config, tokenizer, image preprocessing, text and vision towers.

pub mod config;
pub mod preprocess;
pub mod tokenizer;

pub use config::{ClipConfig, TextConfig, VisionConfig};
pub use preprocess::{load_image, PreprocessConfig};
pub use tokenizer::ClipTokenizer;

//! A synthetic world that vqclip can describe exactly: one or two flat shapes of named colours,
//! sizes and positions on a background of a named colour, with captions from a small grammar
//! over the same words. Deterministic from a seed; train and held-out splits never share a
//! sample index.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A named colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// (220, 30, 30)
    Red,
    /// (40, 170, 60)
    Green,
    /// (40, 70, 220)
    Blue,
    /// (240, 220, 40)
    Yellow,
    /// (245, 140, 20)
    Orange,
    /// (140, 50, 180)
    Purple,
    /// (245, 245, 245)
    White,
    /// (15, 15, 15)
    Black,
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Orange,
        Colour::Purple,
        Colour::White,
        Colour::Black,
    ];
    /// The word used in captions.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Orange => "orange",
            Colour::Purple => "purple",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }
    /// sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 70, 220],
            Colour::Yellow => [240, 220, 40],
            Colour::Orange => [245, 140, 20],
            Colour::Purple => [140, 50, 180],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
        }
    }
    /// The named colour nearest to an RGB value (squared distance), for judging images.
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        let d = |c: Colour| {
            let v = c.rgb();
            (0..3).map(|i| (rgb[i] - v[i] as f32).powi(2)).sum::<f32>()
        };
        Colour::ALL
            .into_iter()
            .min_by(|a, b| d(*a).total_cmp(&d(*b)))
            .unwrap_or(Colour::Black)
    }
    /// Parses a caption word.
    pub fn from_word(w: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.word() == w)
    }
}

/// A shape kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upward-pointing triangle.
    Triangle,
    /// A square rotated by 45°.
    Diamond,
}

impl ShapeKind {
    /// Every shape.
    pub const ALL: [ShapeKind; 4] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Diamond,
    ];
    /// The word used in captions.
    pub fn word(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Diamond => "diamond",
        }
    }
    /// Parses a caption word.
    pub fn from_word(w: &str) -> Option<ShapeKind> {
        ShapeKind::ALL.into_iter().find(|c| c.word() == w)
    }
    /// True if the point (dx, dy), relative to the centre in units of the half-size, is inside.
    fn contains(self, dx: f32, dy: f32) -> bool {
        match self {
            ShapeKind::Circle => dx * dx + dy * dy <= 1.0,
            ShapeKind::Square => dx.abs() <= 0.85 && dy.abs() <= 0.85,
            // apex at (0, -1), base from (-1, 0.8) to (1, 0.8)
            ShapeKind::Triangle => (-1.0..=0.8).contains(&dy) && dx.abs() <= (dy + 1.0) / 1.8,
            ShapeKind::Diamond => dx.abs() + dy.abs() <= 1.0,
        }
    }
}

/// Where a shape sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The middle.
    Centre,
    /// Upper left quadrant.
    TopLeft,
    /// Upper right quadrant.
    TopRight,
    /// Lower left quadrant.
    BottomLeft,
    /// Lower right quadrant.
    BottomRight,
}

impl Position {
    /// Every position.
    pub const ALL: [Position; 5] = [
        Position::Centre,
        Position::TopLeft,
        Position::TopRight,
        Position::BottomLeft,
        Position::BottomRight,
    ];
    /// The phrase used in captions ("at the top left").
    pub fn words(self) -> &'static str {
        match self {
            Position::Centre => "in the centre",
            Position::TopLeft => "at the top left",
            Position::TopRight => "at the top right",
            Position::BottomLeft => "at the bottom left",
            Position::BottomRight => "at the bottom right",
        }
    }
    /// Centre of the position as fractions of the image width and height.
    pub fn centre(self) -> (f32, f32) {
        match self {
            Position::Centre => (0.5, 0.5),
            Position::TopLeft => (0.28, 0.28),
            Position::TopRight => (0.72, 0.28),
            Position::BottomLeft => (0.28, 0.72),
            Position::BottomRight => (0.72, 0.72),
        }
    }
}

/// One shape in a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// What it is.
    pub kind: ShapeKind,
    /// Its colour.
    pub colour: Colour,
    /// Large (true) or small.
    pub large: bool,
    /// Where it is.
    pub position: Position,
}

impl Shape {
    /// Half-size as a fraction of the image side.
    pub fn half_size(&self) -> f32 {
        if self.large {
            0.3
        } else {
            0.16
        }
    }
}

/// A picture: a background and one or two shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Background colour.
    pub background: Colour,
    /// The shapes, drawn in order.
    pub shapes: Vec<Shape>,
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

impl Scene {
    /// A random scene: one shape (two with probability 1/4, in different quadrants), shape
    /// colours different from the background.
    pub fn random(rng: &mut ChaCha8Rng) -> Scene {
        let background = pick(rng, &Colour::ALL);
        let n = if rng.random_range(0..4) == 0 { 2 } else { 1 };
        let mut shapes: Vec<Shape> = Vec::with_capacity(n);
        while shapes.len() < n {
            let colour = pick(rng, &Colour::ALL);
            if colour == background {
                continue;
            }
            let position = if n == 1 {
                pick(rng, &Position::ALL)
            } else {
                pick(rng, &Position::ALL[1..])
            };
            if shapes.iter().any(|s| s.position == position) {
                continue;
            }
            shapes.push(Shape {
                kind: pick(rng, &ShapeKind::ALL),
                colour,
                large: n == 1 && rng.random_range(0..2) == 0,
                position,
            });
        }
        Scene { background, shapes }
    }

    /// Renders the scene as `size`×`size` RGB bytes (row-major HWC), 4×4 supersampled.
    pub fn render(&self, size: usize) -> Vec<u8> {
        const SS: usize = 4;
        let mut out = vec![0u8; size * size * 3];
        let bg = self.background.rgb();
        for y in 0..size {
            for x in 0..size {
                let mut acc = [0u32; 3];
                for sy in 0..SS {
                    for sx in 0..SS {
                        let fx = (x as f32 + (sx as f32 + 0.5) / SS as f32) / size as f32;
                        let fy = (y as f32 + (sy as f32 + 0.5) / SS as f32) / size as f32;
                        let mut c = bg;
                        for s in &self.shapes {
                            let (cx, cy) = s.position.centre();
                            let h = s.half_size();
                            if s.kind.contains((fx - cx) / h, (fy - cy) / h) {
                                c = s.colour.rgb();
                            }
                        }
                        for i in 0..3 {
                            acc[i] += c[i] as u32;
                        }
                    }
                }
                for i in 0..3 {
                    out[(y * size + x) * 3 + i] =
                        ((acc[i] + (SS * SS / 2) as u32) / (SS * SS) as u32) as u8;
                }
            }
        }
        out
    }

    /// Renders the scene as planar RGB `[3, height, width]` in [0, 1]: rendered square at the
    /// longer side, then cropped to the centre.
    pub fn render_chw(&self, width: usize, height: usize) -> Vec<f32> {
        let side = width.max(height);
        let rgb = self.render(side);
        let (x0, y0) = ((side - width) / 2, (side - height) / 2);
        let mut out = vec![0.0; 3 * width * height];
        for c in 0..3 {
            for y in 0..height {
                for x in 0..width {
                    out[(c * height + y) * width + x] =
                        rgb[((y + y0) * side + x + x0) * 3 + c] as f32 / 255.0;
                }
            }
        }
        out
    }

    /// `n` scenes from `seed` that cover the world: first one one-shape scene for every
    /// (background, shape colour, shape kind) combination (8 × 7 × 4 = 224, in a seeded
    /// random order, each with a random size and position), then [`Scene::random`] scenes
    /// (one or two shapes). With `n` below 224 it is a random subset of the combinations.
    /// A random pool of the same size would miss a given combination often: one scene in
    /// 299 is a given one-shape combination, so 512 random scenes hold none of it about one
    /// time in six.
    pub fn covering(seed: u64, n: usize) -> Vec<Scene> {
        use rand::seq::SliceRandom;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut combos = Vec::new();
        for background in Colour::ALL {
            for colour in Colour::ALL.into_iter().filter(|&c| c != background) {
                for kind in ShapeKind::ALL {
                    combos.push((background, colour, kind));
                }
            }
        }
        combos.shuffle(&mut rng);
        let mut out: Vec<Scene> = Vec::with_capacity(n);
        for (background, colour, kind) in combos.into_iter().take(n) {
            let large = rng.random_range(0..2) == 0;
            let position = pick(&mut rng, &Position::ALL);
            out.push(Scene {
                background,
                shapes: vec![Shape {
                    kind,
                    colour,
                    large,
                    position,
                }],
            });
        }
        while out.len() < n {
            out.push(Scene::random(&mut rng));
        }
        out
    }

    /// One caption of the scene; `variant` picks among the grammar's phrasings.
    pub fn caption(&self, variant: usize) -> String {
        let np = |s: &Shape, with_size: bool| {
            let size = if with_size {
                if s.large {
                    "large "
                } else {
                    "small "
                }
            } else {
                ""
            };
            format!("a {size}{} {}", s.colour.word(), s.kind.word())
        };
        let bg = self.background.word();
        match self.shapes.as_slice() {
            [s] => match variant % 4 {
                0 => format!("{} on a {bg} background", np(s, false)),
                1 => format!("{} on a {bg} background", np(s, true)),
                2 => format!("{} {}", np(s, false), s.position.words()),
                _ => format!(
                    "{} {} on a {bg} background",
                    np(s, true),
                    s.position.words()
                ),
            },
            [a, b, ..] => match variant % 2 {
                0 => format!("{} and {} on a {bg} background", np(a, false), np(b, false)),
                _ => format!(
                    "{} {} and {} {}",
                    np(a, false),
                    a.position.words(),
                    np(b, false),
                    b.position.words()
                ),
            },
            [] => format!("a plain {bg} background"),
        }
    }
}

/// Which part of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training samples.
    Train,
    /// Held-out samples for evaluation (a disjoint random stream).
    HeldOut,
}

/// A deterministic, endless stream of (scene, caption) samples.
#[derive(Debug, Clone)]
pub struct ShapesDataset {
    seed: u64,
    split: Split,
}

impl ShapesDataset {
    /// The dataset for `seed` and `split`.
    pub fn new(seed: u64, split: Split) -> Self {
        ShapesDataset { seed, split }
    }

    /// Sample `index`: the same (seed, split, index) always gives the same scene and caption.
    pub fn sample(&self, index: u64) -> (Scene, String) {
        let stream = match self.split {
            Split::Train => 0u64,
            Split::HeldOut => 1u64,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(stream);
        rng.set_word_pos(index as u128 * 1024);
        let scene = Scene::random(&mut rng);
        let variant = rng.random_range(0..4usize);
        let caption = scene.caption(variant);
        (scene, caption)
    }
}

/// Every word the caption grammar of [`Scene::caption`] uses, sorted.
pub fn grammar_words() -> Vec<String> {
    let mut words: std::collections::BTreeSet<String> =
        ["a", "on", "background", "large", "small", "and", "plain"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    words.extend(Colour::ALL.iter().map(|c| c.word().to_string()));
    words.extend(ShapeKind::ALL.iter().map(|k| k.word().to_string()));
    for p in Position::ALL {
        words.extend(p.words().split(' ').map(str::to_string));
    }
    words.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_covering_pool_holds_every_one_shape_combination_then_random_scenes() {
        let pool = Scene::covering(9, 300);
        assert_eq!(pool.len(), 300);
        assert_eq!(pool, Scene::covering(9, 300), "seeded");
        assert_ne!(pool, Scene::covering(10, 300), "another seed, another pool");
        let mut seen = std::collections::HashSet::new();
        for s in &pool[..224] {
            assert_eq!(s.shapes.len(), 1);
            let sh = s.shapes[0];
            assert_ne!(sh.colour, s.background);
            assert!(seen.insert((s.background.word(), sh.colour.word(), sh.kind.word())));
        }
        assert_eq!(seen.len(), 224, "every combination once");
        // the rest are random scenes: some with two shapes
        assert!(pool[224..].iter().any(|s| s.shapes.len() == 2));
        // sizes and positions vary
        assert!(pool[..224].iter().any(|s| s.shapes[0].large));
        assert!(pool[..224].iter().any(|s| !s.shapes[0].large));
        let small = Scene::covering(9, 10);
        assert_eq!(small.len(), 10);
        assert!(small.iter().all(|s| s.shapes.len() == 1));
    }

    #[test]
    fn planar_renders_match_the_bytes_and_crop_to_the_centre() {
        let s = &Scene::covering(3, 1)[0];
        let rgb = s.render(32);
        let chw = s.render_chw(32, 32);
        for c in 0..3 {
            for i in 0..32 * 32 {
                assert_eq!(chw[c * 1024 + i], rgb[i * 3 + c] as f32 / 255.0);
            }
        }
        // 32x16: rows 8..24 of the 32x32 render
        let wide = s.render_chw(32, 16);
        assert_eq!(wide.len(), 3 * 32 * 16);
        for c in 0..3 {
            for y in 0..16 {
                for x in 0..32 {
                    assert_eq!(wide[(c * 16 + y) * 32 + x], chw[(c * 32 + y + 8) * 32 + x]);
                }
            }
        }
    }

    #[test]
    fn samples_are_deterministic_and_splits_differ() {
        let train = ShapesDataset::new(7, Split::Train);
        let held = ShapesDataset::new(7, Split::HeldOut);
        assert_eq!(train.sample(3), train.sample(3));
        let same = (0..50)
            .filter(|&i| train.sample(i) == held.sample(i))
            .count();
        assert!(
            same < 10,
            "splits should be different streams ({same}/50 equal)"
        );
        let distinct: std::collections::HashSet<String> =
            (0..200).map(|i| train.sample(i).1).collect();
        assert!(
            distinct.len() > 100,
            "captions vary ({} distinct)",
            distinct.len()
        );
    }

    #[test]
    fn rendering_puts_the_named_colours_where_the_caption_says() {
        let scene = Scene {
            background: Colour::Blue,
            shapes: vec![Shape {
                kind: ShapeKind::Circle,
                colour: Colour::Red,
                large: false,
                position: Position::TopLeft,
            }],
        };
        let img = scene.render(64);
        let px = |x: usize, y: usize| {
            let o = (y * 64 + x) * 3;
            [img[o], img[o + 1], img[o + 2]]
        };
        assert_eq!(px(18, 18), Colour::Red.rgb()); // centre of the top-left circle
        assert_eq!(px(60, 60), Colour::Blue.rgb());
        assert_eq!(px(46, 18), Colour::Blue.rgb());
        assert_eq!(scene.caption(0), "a red circle on a blue background");
        assert_eq!(scene.caption(2), "a red circle at the top left");
        assert_eq!(Colour::nearest([200.0, 40.0, 35.0]), Colour::Red);
    }

    #[test]
    fn shapes_differ_in_their_pixels() {
        let mk = |kind| Scene {
            background: Colour::Black,
            shapes: vec![Shape {
                kind,
                colour: Colour::White,
                large: true,
                position: Position::Centre,
            }],
        };
        let imgs: Vec<Vec<u8>> = ShapeKind::ALL.iter().map(|&k| mk(k).render(32)).collect();
        for i in 0..imgs.len() {
            for j in i + 1..imgs.len() {
                assert_ne!(
                    imgs[i],
                    imgs[j],
                    "{:?} vs {:?}",
                    ShapeKind::ALL[i],
                    ShapeKind::ALL[j]
                );
            }
        }
        // Every scene keeps its shape colour off the background.
        let ds = ShapesDataset::new(1, Split::Train);
        for i in 0..100 {
            let (s, _) = ds.sample(i);
            assert!(s.shapes.iter().all(|sh| sh.colour != s.background));
        }
    }
}

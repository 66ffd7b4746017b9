#!/usr/bin/env python3
"""How well a shapes CLIP tells sizes and positions apart (not used by CI): the cosine of a
prompt with size and position words to the ten size x position renders of its scene, best
four printed. Reuses the renderer and loading of tools/clip_pool_probe.py.

    /work/pyenv/bin/python tools/clip_position_probe.py weights/clip
"""
import os, sys
clip_dir = sys.argv[1] if len(sys.argv) > 1 else 'weights/clip'
sys.argv = [sys.argv[0], clip_dir, '0']
src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip_pool_probe.py')).read()
exec(src.split("cases=")[0])
names = ['centre', 'top left', 'top right', 'bottom left', 'bottom right']
for prompt, (c, k, b) in [("a small red circle at the top left on a blue background", ('red', 'circle', 'blue')),
                          ("a purple triangle at the bottom right", ('purple', 'triangle', 'white')),
                          ("a large green square at the top right on a black background", ('green', 'square', 'black'))]:
    t = T([prompt]); rows = []
    for large in [False, True]:
        for p in range(5):
            x = torch.from_numpy(render(b, [(k, c, large, p)])[None]).float().permute(0, 3, 1, 2) / 255
            with torch.no_grad():
                e = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=(x - mean) / std).pooler_output), dim=-1)
            rows.append(((e @ t.T).item(), ('large' if large else 'small') + ' ' + names[p]))
    rows.sort(reverse=True)
    print(prompt, 'range', round(rows[-1][0], 3), '-', round(rows[0][0], 3), 'best', [(round(a, 3), n) for a, n in rows[:4]])

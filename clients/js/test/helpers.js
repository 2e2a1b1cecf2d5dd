// Inputs the tests make themselves: PNG images (no imaging library needed), their header read
// back, and a text corpus with its word count computed here, the way `wordcount.map`
// tokenises ASCII text. The same inputs as clients/python/tests/helpers.py.

import { deflateSync } from "node:zlib";

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

/** @param {Uint8Array} bytes */
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = (CRC_TABLE[(c ^ b) & 0xff] ?? 0) ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/**
 * An RGB PNG with a gradient, so that resizing or blurring it is real work.
 * @param {number} width @param {number} height
 */
export function png(width, height) {
  const rows = Buffer.alloc((width * 3 + 1) * height);
  let o = 0;
  for (let y = 0; y < height; y++) {
    rows[o++] = 0;
    for (let x = 0; x < width; x++) {
      rows[o++] = (x * 7 + y) % 256;
      rows[o++] = (y * 3) % 256;
      rows[o++] = (x ^ y) % 256;
    }
  }
  const chunk = (/** @type {string} */ kind, /** @type {Buffer} */ data) => {
    const body = Buffer.concat([Buffer.from(kind, "latin1"), data]);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8);
  return new Uint8Array(
    Buffer.concat([
      Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
      chunk("IHDR", header),
      chunk("IDAT", deflateSync(rows)),
      chunk("IEND", Buffer.alloc(0)),
    ]),
  );
}

/**
 * Width and height from a PNG's IHDR, after checking the signature and the chunk's name.
 * @param {Uint8Array} bytes
 */
export function pngSize(bytes) {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sig = b.subarray(0, 8).toString("hex");
  if (sig !== "89504e470d0a1a0a") throw new Error(`not a PNG: starts with ${sig}`);
  if (b.subarray(12, 16).toString("latin1") !== "IHDR") throw new Error("PNG without IHDR first");
  return { width: b.readUInt32BE(16), height: b.readUInt32BE(20) };
}

const WORDS = "the cat sat on a mat while spine agents count every word in these fragments".split(
  " ",
);

/** `n` ASCII texts of a few hundred words each, different from one another. @param {number} n */
export function corpus(n) {
  const out = [];
  for (let f = 0; f < n; f++) {
    const words = [];
    for (let i = 0; i < 200 + f * 13; i++) words.push(WORDS[(f * 7 + i * i) % WORDS.length]);
    out.push(`${words.join(" ")}\nfragment ${f} ends here.\n`);
  }
  return out;
}

/** @param {string[]} texts @returns {Record<string, number>} */
export function wordCount(texts) {
  /** @type {Record<string, number>} */
  const counts = {};
  for (const t of texts) {
    for (const w of t.match(/[A-Za-z0-9]+/g) ?? []) {
      const k = w.toLowerCase();
      counts[k] = (counts[k] ?? 0) + 1;
    }
  }
  return counts;
}

package cape.cbor;

import cape.errors.FormatException;
import java.io.ByteArrayOutputStream;
import java.math.BigInteger;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;

/**
 * A small, strict CBOR (RFC 8949) reader for attestation documents, and the few encodings a
 * COSE {@code Sig_structure} needs.
 *
 * <p>No packaged Debian library fits (Jackson's CBOR module is not packaged for Java 17 here), so
 * this reads exactly what Nitro documents use, as strictly as {@code cape.formats.cose.loads_cbor}
 * plus the canonical-encoding rule the Python parser enforces by re-encoding: duplicate map keys,
 * indefinite lengths, non-minimal lengths, floats, simple values other than false/true/null,
 * nesting deeper than {@link #MAX_DEPTH} and trailing bytes are all refused with a
 * {@link FormatException}.
 *
 * <p>Decoded values: {@link Long} (or {@link BigInteger} beyond the signed range) for integers,
 * {@code byte[]}, {@link String}, {@link List}, {@link Map} (insertion ordered, unmodifiable),
 * {@link Tagged}, {@link Boolean} and {@code null}.
 */
public final class Cbor {
    /** The deepest nesting accepted (as the Python reader's {@code MAX_CBOR_DEPTH}). */
    public static final int MAX_DEPTH = 16;

    /** A tagged item (COSE_Sign1 may arrive as tag 18). */
    public record Tagged(long tag, Object value) {}

    private final byte[] data;
    private final String what;
    private int pos;

    private Cbor(byte[] data, String what) {
        this.data = data;
        this.what = what;
    }

    /** Decode exactly one item from {@code data}; {@code what} names it in error messages. */
    public static Object decode(byte[] data, String what) {
        Objects.requireNonNull(data, "data");
        Cbor reader = new Cbor(data, what);
        Object item = reader.item(0);
        if (reader.pos != data.length) {
            throw new FormatException(
                    what + " has " + (data.length - reader.pos) + " trailing bytes after the CBOR item");
        }
        return item;
    }

    private FormatException bad(String detail) {
        return new FormatException(what + " is not valid CBOR: " + detail);
    }

    private int next() {
        if (pos >= data.length) {
            throw bad("unexpected end of data");
        }
        return data[pos++] & 0xff;
    }

    /** The argument of a head byte, refusing indefinite and non-minimal encodings. */
    private BigInteger argument(int info) {
        if (info < 24) {
            return BigInteger.valueOf(info);
        }
        int size;
        switch (info) {
            case 24 -> size = 1;
            case 25 -> size = 2;
            case 26 -> size = 4;
            case 27 -> size = 8;
            case 31 -> throw bad("indefinite lengths are not allowed");
            default -> throw bad("reserved additional information " + info);
        }
        if (data.length - pos < size) {
            throw bad("unexpected end of data");
        }
        BigInteger value = new BigInteger(1, Arrays.copyOfRange(data, pos, pos + size));
        pos += size;
        BigInteger minimum = switch (size) {
            case 1 -> BigInteger.valueOf(24);
            case 2 -> BigInteger.valueOf(0x100);
            case 4 -> BigInteger.valueOf(0x10000);
            default -> BigInteger.valueOf(0x100000000L);
        };
        if (value.compareTo(minimum) < 0) {
            throw bad("non-minimal length or integer encoding");
        }
        return value;
    }

    private int length(int info) {
        BigInteger value = argument(info);
        if (value.compareTo(BigInteger.valueOf(data.length - pos)) > 0) {
            throw bad("length " + value + " runs past the end of the data");
        }
        return value.intValueExact();
    }

    private static Object integer(BigInteger value) {
        return value.bitLength() < 64 ? (Object) value.longValueExact() : value;
    }

    private Object item(int depth) {
        if (depth > MAX_DEPTH) {
            throw bad("nested deeper than " + MAX_DEPTH);
        }
        int head = next();
        int major = head >> 5;
        int info = head & 0x1f;
        switch (major) {
            case 0:
                return integer(argument(info));
            case 1:
                return integer(BigInteger.ONE.negate().subtract(argument(info)));
            case 2: {
                int n = length(info);
                byte[] bytes = Arrays.copyOfRange(data, pos, pos + n);
                pos += n;
                return bytes;
            }
            case 3: {
                int n = length(info);
                String text = utf8(Arrays.copyOfRange(data, pos, pos + n));
                pos += n;
                return text;
            }
            case 4: {
                int n = length(info); // each item takes at least one byte, so this bounds n
                List<Object> items = new ArrayList<>(n);
                for (int i = 0; i < n; i++) {
                    items.add(item(depth + 1));
                }
                return Collections.unmodifiableList(items);
            }
            case 5: {
                int n = length(info);
                Map<Object, Object> map = new LinkedHashMap<>();
                for (int i = 0; i < n; i++) {
                    Object key = item(depth + 1);
                    Object hashable = key instanceof byte[] b ? ByteBuffer.wrap(b) : key;
                    if (key instanceof List || key instanceof Map || key instanceof Tagged) {
                        throw bad("map keys must be integers, strings or byte strings");
                    }
                    if (map.containsKey(hashable)) {
                        throw bad("duplicate map key " + key);
                    }
                    map.put(hashable, item(depth + 1));
                }
                return Collections.unmodifiableMap(map);
            }
            case 6: {
                BigInteger tag = argument(info);
                return new Tagged(tag.longValue(), item(depth + 1));
            }
            default: // major 7
                return switch (info) {
                    case 20 -> Boolean.FALSE;
                    case 21 -> Boolean.TRUE;
                    case 22 -> null;
                    case 25, 26, 27 -> throw bad("floating-point values are not allowed");
                    case 31 -> throw bad("indefinite lengths are not allowed");
                    default -> throw bad("simple value " + info + " is not allowed");
                };
        }
    }

    private String utf8(byte[] bytes) {
        try {
            return StandardCharsets.UTF_8
                    .newDecoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(bytes))
                    .toString();
        } catch (CharacterCodingException e) {
            throw bad("a text string is not UTF-8");
        }
    }

    // -- the encodings a Sig_structure needs ------------------------------------------------------

    private static void head(ByteArrayOutputStream out, int major, long value) {
        int m = major << 5;
        if (value < 24) {
            out.write(m | (int) value);
        } else if (value < 0x100) {
            out.write(m | 24);
            out.write((int) value);
        } else if (value < 0x10000) {
            out.write(m | 25);
            out.write((int) (value >> 8));
            out.write((int) value);
        } else if (value < 0x100000000L) {
            out.write(m | 26);
            for (int shift = 24; shift >= 0; shift -= 8) {
                out.write((int) (value >> shift));
            }
        } else {
            out.write(m | 27);
            for (int shift = 56; shift >= 0; shift -= 8) {
                out.write((int) (value >> shift));
            }
        }
    }

    /**
     * The CBOR encoding of an array of text and byte strings, e.g. COSE's
     * {@code ["Signature1", protected, external_aad, payload]}.
     */
    public static byte[] encodeArray(Object... items) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        head(out, 4, items.length);
        for (Object item : items) {
            if (item instanceof String text) {
                byte[] bytes = text.getBytes(StandardCharsets.UTF_8);
                head(out, 3, bytes.length);
                out.writeBytes(bytes);
            } else if (item instanceof byte[] bytes) {
                head(out, 2, bytes.length);
                out.writeBytes(bytes);
            } else {
                throw new IllegalArgumentException("only text and byte strings are encoded");
            }
        }
        return out.toByteArray();
    }

    /** A map's value for a byte-string key (keys of decoded maps are wrapped for equality). */
    public static Object get(Map<?, ?> map, Object key) {
        return map.get(key instanceof byte[] b ? ByteBuffer.wrap(b) : key);
    }
}

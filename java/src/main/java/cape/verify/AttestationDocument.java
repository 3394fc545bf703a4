package cape.verify;

import cape.cbor.Cbor;
import cape.errors.FormatException;
import java.nio.ByteBuffer;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * A parsed AWS Nitro (or simulated) attestation document: the COSE_Sign1 envelope and its payload.
 *
 * <p>{@link #parse} applies every structural rule of {@code cape.formats.attestation} (the table
 * in nitro-attestation.md §3.2) and the canonical NSM encoding (keys in NSM order, PCRs ascending,
 * minimal lengths); whether the document is trustworthy is {@link Verifier}'s job.
 */
public final class AttestationDocument {
    public static final int MAX_PAYLOAD_BYTES = 16384;
    public static final int MAX_DOCUMENT_BYTES = MAX_PAYLOAD_BYTES + 1024;
    static final int MAX_CERT_BYTES = 1024;
    static final int MAX_PUBLIC_KEY_BYTES = 1024;
    static final int MAX_USER_DATA_BYTES = 1024;
    static final int MAX_NONCE_BYTES = 1024;
    static final int MAX_PCRS = 32;
    static final long ALG_ES384 = -35;
    static final int ES384_SIGNATURE_BYTES = 96;
    private static final List<String> FIELDS = List.of(
            "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key",
            "user_data", "nonce");

    private final byte[] protectedHeader;
    private final byte[] payload;
    private final byte[] signature;
    private final String moduleId;
    private final long timestamp;
    private final Map<Integer, byte[]> pcrs;
    private final byte[] certificate;
    private final List<byte[]> cabundle;
    private final byte[] publicKey;
    private final byte[] userData;
    private final byte[] nonce;

    private AttestationDocument(
            byte[] protectedHeader, byte[] payload, byte[] signature, Map<?, ?> item) {
        this.protectedHeader = protectedHeader;
        this.payload = payload;
        this.signature = signature;
        this.moduleId = (String) item.get("module_id");
        this.timestamp = (Long) item.get("timestamp");
        Map<Integer, byte[]> parsedPcrs = new TreeMap<>();
        for (Map.Entry<?, ?> e : ((Map<?, ?>) item.get("pcrs")).entrySet()) {
            parsedPcrs.put(((Long) e.getKey()).intValue(), (byte[]) e.getValue());
        }
        this.pcrs = Collections.unmodifiableMap(parsedPcrs);
        this.certificate = (byte[]) item.get("certificate");
        List<byte[]> bundle = new ArrayList<>();
        for (Object cert : (List<?>) item.get("cabundle")) {
            bundle.add((byte[]) cert);
        }
        this.cabundle = Collections.unmodifiableList(bundle);
        this.publicKey = (byte[]) item.get("public_key");
        this.userData = (byte[]) item.get("user_data");
        this.nonce = (byte[]) item.get("nonce");
    }

    /** Parse a COSE_Sign1 attestation document (raw CBOR bytes) without trusting it. */
    public static AttestationDocument parse(byte[] data) {
        if (data.length > MAX_DOCUMENT_BYTES) {
            throw new FormatException("attestation document is " + data.length
                    + " bytes; at most " + MAX_DOCUMENT_BYTES + " allowed");
        }
        Object item = Cbor.decode(data, "COSE_Sign1 document");
        if (item instanceof Cbor.Tagged tagged) {
            if (tagged.tag() != 18) {
                throw new FormatException(
                        "unexpected CBOR tag " + tagged.tag() + " (COSE_Sign1 is tag 18)");
            }
            item = tagged.value();
        }
        if (!(item instanceof List<?> parts) || parts.size() != 4) {
            throw new FormatException("COSE_Sign1 must be an array of 4 items");
        }
        if (!(parts.get(0) instanceof byte[] protectedHeader)) {
            throw new FormatException("COSE_Sign1 protected header must be a byte string");
        }
        if (!(parts.get(1) instanceof Map)) {
            throw new FormatException("COSE_Sign1 unprotected header must be a map");
        }
        if (!(parts.get(2) instanceof byte[] payload)) {
            throw new FormatException(
                    "COSE_Sign1 payload must be a byte string (detached payloads are refused)");
        }
        if (!(parts.get(3) instanceof byte[] signature)) {
            throw new FormatException("COSE_Sign1 signature must be a byte string");
        }
        Object header = protectedHeader.length == 0
                ? Map.of() : Cbor.decode(protectedHeader, "COSE protected header");
        if (!(header instanceof Map<?, ?> headerMap)) {
            throw new FormatException("COSE protected header is not a map");
        }
        if (!Long.valueOf(ALG_ES384).equals(headerMap.get(1L))) {
            throw new FormatException("attestation document must be signed with ES384 (COSE alg -35)");
        }
        if (signature.length != ES384_SIGNATURE_BYTES) {
            throw new FormatException("ES384 signature must be " + ES384_SIGNATURE_BYTES
                    + " bytes, got " + signature.length);
        }
        return new AttestationDocument(protectedHeader, payload, signature, parsePayload(payload));
    }

    private static Map<?, ?> parsePayload(byte[] payload) {
        if (payload.length < 1 || payload.length > MAX_PAYLOAD_BYTES) {
            throw new FormatException("attestation payload is " + payload.length
                    + " bytes; allowed 1.." + MAX_PAYLOAD_BYTES);
        }
        Object decoded = Cbor.decode(payload, "attestation payload");
        if (!(decoded instanceof Map<?, ?> item)) {
            throw new FormatException("attestation payload must be a CBOR map");
        }
        List<String> missing = FIELDS.stream().filter(f -> !item.containsKey(f)).toList();
        if (!missing.isEmpty()) {
            throw new FormatException(
                    "attestation payload lacks field(s): " + String.join(", ", missing));
        }
        List<String> unknown = new ArrayList<>();
        for (Object key : item.keySet()) {
            if (!(key instanceof String s) || !FIELDS.contains(s)) {
                unknown.add(String.valueOf(key));
            }
        }
        if (!unknown.isEmpty()) {
            throw new FormatException(
                    "attestation payload has unknown field(s): " + String.join(", ", unknown));
        }
        if (!(item.get("module_id") instanceof String moduleId) || moduleId.isEmpty()) {
            throw new FormatException("attestation field 'module_id' must be a non-empty text string");
        }
        if (!"SHA384".equals(item.get("digest"))) {
            throw new FormatException("attestation field 'digest' must be 'SHA384'");
        }
        if (!(item.get("timestamp") instanceof Long timestamp) || timestamp <= 0) {
            throw new FormatException("attestation field 'timestamp' must be a positive integer (ms)");
        }
        if (!(item.get("pcrs") instanceof Map<?, ?> pcrs) || pcrs.isEmpty() || pcrs.size() > MAX_PCRS) {
            throw new FormatException(
                    "attestation field 'pcrs' must be a map of 1.." + MAX_PCRS + " entries");
        }
        long previous = -1;
        for (Map.Entry<?, ?> e : pcrs.entrySet()) {
            if (!(e.getKey() instanceof Long index) || index < 0 || index >= MAX_PCRS) {
                throw new FormatException(
                        "PCR index " + e.getKey() + " is outside 0.." + (MAX_PCRS - 1));
            }
            if (!(e.getValue() instanceof byte[] value)
                    || (value.length != 32 && value.length != 48 && value.length != 64)) {
                throw new FormatException("PCR" + index + " must be a byte string of 32, 48 or 64 bytes");
            }
            if (index <= previous) {
                throw canonical();
            }
            previous = index;
        }
        bytes(item.get("certificate"), "certificate", 1, MAX_CERT_BYTES);
        if (!(item.get("cabundle") instanceof List<?> cabundle) || cabundle.isEmpty()) {
            throw new FormatException("attestation field 'cabundle' must be a non-empty array");
        }
        for (int i = 0; i < cabundle.size(); i++) {
            bytes(cabundle.get(i), "cabundle[" + i + "]", 1, MAX_CERT_BYTES);
        }
        optionalBytes(item.get("public_key"), "public_key", 1, MAX_PUBLIC_KEY_BYTES);
        optionalBytes(item.get("user_data"), "user_data", 0, MAX_USER_DATA_BYTES);
        optionalBytes(item.get("nonce"), "nonce", 0, MAX_NONCE_BYTES);
        // One document, one encoding: keys in NSM order (the reader already refused
        // non-minimal lengths, tags inside the payload are refused by the type checks above).
        if (!new ArrayList<>(item.keySet()).equals(FIELDS)) {
            throw canonical();
        }
        return item;
    }

    private static FormatException canonical() {
        return new FormatException("attestation payload is not in the canonical NSM encoding");
    }

    private static void bytes(Object value, String name, int low, int high) {
        if (!(value instanceof byte[] bytes)) {
            throw new FormatException("attestation field '" + name + "' must be a byte string");
        }
        if (bytes.length < low || bytes.length > high) {
            throw new FormatException("attestation field '" + name + "' is " + bytes.length
                    + " bytes; allowed " + low + ".." + high);
        }
    }

    private static void optionalBytes(Object value, String name, int low, int high) {
        if (value != null) {
            bytes(value, name, low, high);
        }
    }

    /** The {@code Sig_structure} the signature covers (RFC 8152 §4.4). */
    byte[] toBeSigned() {
        return Cbor.encodeArray("Signature1", protectedHeader, new byte[0], payload);
    }

    byte[] signature() {
        return signature.clone();
    }

    public String moduleId() {
        return moduleId;
    }

    /** Milliseconds since the Unix epoch, as the NSM writes it. */
    public long timestamp() {
        return timestamp;
    }

    public Instant issuedAt() {
        return Instant.ofEpochMilli(timestamp);
    }

    /** PCR index to value, ascending. */
    public Map<Integer, byte[]> pcrs() {
        return pcrs;
    }

    public byte[] certificate() {
        return certificate.clone();
    }

    /** DER certificates, root first, then each intermediate down to the leaf's issuer. */
    public List<byte[]> cabundle() {
        return cabundle;
    }

    /** The per-session X25519 key, or {@code null}. */
    public byte[] publicKey() {
        return publicKey == null ? null : publicKey.clone();
    }

    public byte[] userData() {
        return userData == null ? null : userData.clone();
    }

    public byte[] nonce() {
        return nonce == null ? null : nonce.clone();
    }

    /** Debug mode: PCR0 absent or all zeros (Nitro zeroes PCR0-2 in debug mode). */
    public boolean isDebug() {
        byte[] pcr0 = pcrs.get(0);
        return pcr0 == null || ByteBuffer.wrap(pcr0).equals(ByteBuffer.wrap(new byte[pcr0.length]));
    }
}

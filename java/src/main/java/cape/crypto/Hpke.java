package cape.crypto;

import cape.errors.KeyFormatException;
import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.SecureRandom;
import javax.crypto.Cipher;
import javax.crypto.Mac;
import javax.crypto.spec.IvParameterSpec;
import javax.crypto.spec.SecretKeySpec;
import org.bouncycastle.crypto.digests.SHA256Digest;
import org.bouncycastle.crypto.generators.HKDFBytesGenerator;
import org.bouncycastle.crypto.params.HKDFParameters;
import org.bouncycastle.crypto.params.X25519PrivateKeyParameters;
import org.bouncycastle.crypto.params.X25519PublicKeyParameters;

/**
 * HPKE (RFC 9180) base-mode single-shot sealing with Cape's one suite: DHKEM(X25519, HKDF-SHA256),
 * HKDF-SHA256, ChaCha20-Poly1305, empty info and aad; wire form {@code enc(32) || ciphertext}.
 *
 * <p>Debian's Bouncy Castle (1.72) predates its HPKE classes, so this composes RFC 9180 §4-5
 * from library primitives only: X25519 and HKDF from Bouncy Castle, ChaCha20-Poly1305 from the
 * JDK. It is checked against RFC 9180's known-answer vector for this suite (Appendix A.2.1) and by
 * the Python enclave opening these frames (every live call).
 */
public final class Hpke {
    public static final int KEY_BYTES = 32;
    private static final byte[] VERSION = ascii("HPKE-v1");
    private static final byte[] KEM_SUITE = concat(ascii("KEM"), new byte[] {0x00, 0x20});
    private static final byte[] SUITE =
            concat(ascii("HPKE"), new byte[] {0x00, 0x20, 0x00, 0x01, 0x00, 0x03});
    private static final SecureRandom RANDOM = new SecureRandom();

    private Hpke() {}

    /** Seal {@code plaintext} to a raw X25519 public key; returns {@code enc || ciphertext}. */
    public static byte[] seal(byte[] recipientPublic, byte[] plaintext) {
        return seal(recipientPublic, plaintext, new X25519PrivateKeyParameters(RANDOM), new byte[0], new byte[0]);
    }

    /**
     * The same with a given ephemeral key, {@code info} and {@code aad}: Cape uses empty ones; the
     * known-answer test ({@code CryptoTest.hpkeMatchesRfc9180Vector}) needs the vector's.
     */
    static byte[] seal(byte[] recipientPublic, byte[] plaintext, X25519PrivateKeyParameters ephemeral,
            byte[] info, byte[] aad) {
        if (recipientPublic.length != KEY_BYTES) {
            throw new KeyFormatException("an HPKE x25519-hkdf-sha256-chacha20poly1305 public key is "
                    + KEY_BYTES + " bytes, not " + recipientPublic.length);
        }
        byte[] enc = ephemeral.generatePublicKey().getEncoded();
        byte[] dh = X25519.agree(ephemeral, new X25519PublicKeyParameters(recipientPublic, 0));
        if (dh == null) {
            throw new KeyFormatException("unusable HPKE x25519-hkdf-sha256-chacha20poly1305 public key");
        }
        // DHKEM ExtractAndExpand (RFC 9180 §4.1)
        byte[] kemContext = concat(enc, recipientPublic);
        byte[] eaePrk = labeledExtract(KEM_SUITE, new byte[0], "eae_prk", dh);
        byte[] shared = labeledExpand(KEM_SUITE, eaePrk, "shared_secret", kemContext, 32);
        // KeySchedule, mode_base, empty psk (RFC 9180 §5.1)
        byte[] pskIdHash = labeledExtract(SUITE, new byte[0], "psk_id_hash", new byte[0]);
        byte[] infoHash = labeledExtract(SUITE, new byte[0], "info_hash", info);
        byte[] context = concat(new byte[] {0x00}, pskIdHash, infoHash);
        byte[] secret = labeledExtract(SUITE, shared, "secret", new byte[0]);
        byte[] key = labeledExpand(SUITE, secret, "key", context, 32);
        byte[] baseNonce = labeledExpand(SUITE, secret, "base_nonce", context, 12);
        try {
            Cipher aead = Cipher.getInstance("ChaCha20-Poly1305");
            aead.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(key, "ChaCha20"), new IvParameterSpec(baseNonce));
            if (aad.length > 0) {
                aead.updateAAD(aad);
            }
            byte[] out = new byte[enc.length + aead.getOutputSize(plaintext.length)];
            System.arraycopy(enc, 0, out, 0, enc.length);
            aead.doFinal(plaintext, 0, plaintext.length, out, enc.length);
            return out;
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("ChaCha20-Poly1305 is unavailable", e);
        }
    }

    private static byte[] labeledExtract(byte[] suite, byte[] salt, String label, byte[] ikm) {
        byte[] labeled = concat(VERSION, suite, ascii(label), ikm);
        // HKDF-Extract(salt, ikm) = HMAC-SHA256(salt or 32 zero bytes, ikm) (RFC 5869 §2.2); the
        // JDK's HMAC, as Debian's Bouncy Castle 1.72 has no public extract-only call.
        try {
            Mac hmac = Mac.getInstance("HmacSHA256");
            hmac.init(new SecretKeySpec(salt.length == 0 ? new byte[32] : salt, "HmacSHA256"));
            return hmac.doFinal(labeled);
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("HMAC-SHA256 is unavailable", e);
        }
    }

    private static byte[] labeledExpand(byte[] suite, byte[] prk, String label, byte[] info, int length) {
        byte[] labeled = concat(new byte[] {(byte) (length >> 8), (byte) length}, VERSION, suite, ascii(label), info);
        HKDFBytesGenerator hkdf = new HKDFBytesGenerator(new SHA256Digest());
        hkdf.init(HKDFParameters.skipExtractParameters(prk, labeled));
        byte[] out = new byte[length];
        hkdf.generateBytes(out, 0, length);
        return out;
    }

    static byte[] ascii(String text) {
        return text.getBytes(StandardCharsets.US_ASCII);
    }

    static byte[] concat(byte[]... parts) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        for (byte[] part : parts) {
            out.writeBytes(part);
        }
        return out.toByteArray();
    }
}

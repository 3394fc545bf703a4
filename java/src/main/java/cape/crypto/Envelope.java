package cape.crypto;

import cape.errors.KeyFormatException;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.KeyFactory;
import java.security.PublicKey;
import java.security.SecureRandom;
import java.security.interfaces.RSAPublicKey;
import java.security.spec.MGF1ParameterSpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Base64;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.OAEPParameterSpec;
import javax.crypto.spec.PSource;
import javax.crypto.spec.SecretKeySpec;

/**
 * Cape's single-shot {@code cape:} envelope, byte-compatible with {@code cape.crypto.envelope},
 * Cape's Go CLI, pycape and cape-js:
 *
 * <pre>
 * RSA-OAEP(SHA-256, MGF1-SHA-256, empty label) of a fresh 32-byte DEK   (512 bytes for RSA-4096)
 * || nonce                                                              (12 random bytes)
 * || AES-256-GCM(DEK, nonce, plaintext, no AAD)                         (len(plaintext) + 16)
 * </pre>
 *
 * Text form: {@code cape:} + standard base64 of that; binary form: {@code cape:} + the raw bytes.
 */
public final class Envelope {
    public static final byte[] PREFIX = "cape:".getBytes(StandardCharsets.US_ASCII);
    public static final int DEK_SIZE = 32;
    public static final int NONCE_SIZE = 12;
    public static final int TAG_SIZE = 16;
    public static final int MIN_RSA_BITS = 2048;
    /** The JDK's OAEP default is SHA-1 for MGF1: every parameter is set explicitly. */
    private static final OAEPParameterSpec OAEP = new OAEPParameterSpec(
            "SHA-256", "MGF1", MGF1ParameterSpec.SHA256, PSource.PSpecified.DEFAULT);
    private static final SecureRandom RANDOM = new SecureRandom();

    private Envelope() {}

    /** An RSA public key (at least 2048 bits) from DER or PEM SubjectPublicKeyInfo. */
    public static RSAPublicKey loadPublicKey(byte[] data) {
        String text = new String(data, StandardCharsets.US_ASCII).strip();
        boolean pem = text.startsWith("-----BEGIN");
        byte[] der = data;
        if (pem) {
            String body = text.replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
            try {
                der = Base64.getDecoder().decode(body);
            } catch (IllegalArgumentException e) {
                der = new byte[0];
            }
        }
        // Whatever kind of key it is, name it (as the Python loader does), then require RSA.
        for (String algorithm : new String[] {"RSA", "EC", "XDH", "EdDSA", "DSA"}) {
            try {
                return checkPublicKey(
                        KeyFactory.getInstance(algorithm).generatePublic(new X509EncodedKeySpec(der)));
            } catch (GeneralSecurityException | RuntimeException e) {
                if (e instanceof KeyFormatException known) {
                    throw known;
                }
            }
        }
        throw new KeyFormatException("not a valid " + (pem ? "PEM" : "DER")
                + " public key (expected SubjectPublicKeyInfo or PKCS#1 RSA)");
    }

    /** {@code key} if it is an RSA public key of at least 2048 bits. */
    public static RSAPublicKey checkPublicKey(PublicKey key) {
        if (!(key instanceof RSAPublicKey rsa)) {
            throw new KeyFormatException("expected an RSA public key, got " + key.getAlgorithm());
        }
        int bits = rsa.getModulus().bitLength();
        if (bits < MIN_RSA_BITS) {
            throw new KeyFormatException(
                    "RSA key is " + bits + " bits; at least " + MIN_RSA_BITS + " bits are required");
        }
        return rsa;
    }

    /** The raw envelope of {@code plaintext} (no prefix) with a fresh DEK and nonce. */
    public static byte[] seal(byte[] plaintext, RSAPublicKey key) {
        return seal(plaintext, key, 0);
    }

    /** The binary form: {@code cape:} + raw envelope (as deploy sends bundles). */
    public static byte[] encrypt(byte[] plaintext, RSAPublicKey key) {
        byte[] out = seal(plaintext, key, PREFIX.length);
        System.arraycopy(PREFIX, 0, out, 0, PREFIX.length);
        return out;
    }

    /** The text form: ASCII {@code cape:} + base64 of the raw envelope (what {@code cape encrypt} prints). */
    public static byte[] encryptText(byte[] plaintext, RSAPublicKey key) {
        byte[] raw = seal(plaintext, key);
        byte[] encoded = Base64.getEncoder().encode(raw);
        byte[] out = new byte[PREFIX.length + encoded.length];
        System.arraycopy(PREFIX, 0, out, 0, PREFIX.length);
        System.arraycopy(encoded, 0, out, PREFIX.length, encoded.length);
        return out;
    }

    /** One output array: {@code offset} free bytes, wrapped key, nonce, ciphertext and tag. */
    private static byte[] seal(byte[] plaintext, RSAPublicKey key, int offset) {
        checkPublicKey(key);
        byte[] dek = new byte[DEK_SIZE];
        byte[] nonce = new byte[NONCE_SIZE];
        RANDOM.nextBytes(dek);
        RANDOM.nextBytes(nonce);
        try {
            Cipher rsa = Cipher.getInstance("RSA/ECB/OAEPPadding");
            rsa.init(Cipher.ENCRYPT_MODE, key, OAEP);
            byte[] wrapped = rsa.doFinal(dek);
            Cipher gcm = Cipher.getInstance("AES/GCM/NoPadding");
            gcm.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(dek, "AES"), new GCMParameterSpec(128, nonce));
            int head = offset + wrapped.length + NONCE_SIZE;
            byte[] out = new byte[Math.addExact(head, gcm.getOutputSize(plaintext.length))];
            System.arraycopy(wrapped, 0, out, offset, wrapped.length);
            System.arraycopy(nonce, 0, out, offset + wrapped.length, NONCE_SIZE);
            gcm.doFinal(plaintext, 0, plaintext.length, out, head);
            return out;
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("RSA-OAEP or AES-GCM is unavailable", e);
        } finally {
            java.util.Arrays.fill(dek, (byte) 0);
        }
    }
}
